"""Masked Autoencoder with a Vision Transformer backbone (He et al. 2021), read top to bottom.

Compatible with facebookresearch/mae `models_mae.MaskedAutoencoderViT`: the same constructor keywords,
the same state-dict keys and shapes (a reference checkpoint loads with strict=True), and the same
forward semantics, so the same images and masking noise give the same loss. Built on timm's PatchEmbed
and Block (fused scaled-dot-product attention). Works for any channel count.
"""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn

from pipeline.presets import POOLS, PRESETS

log = logging.getLogger(__name__)


def sincos_1d(dim: int, positions: np.ndarray) -> np.ndarray:
    """[len(positions), dim]: sines of positions at dim/2 frequencies, then their cosines."""
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
    angles = np.outer(positions.reshape(-1), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(dim: int, grid_size: int, cls_token: bool = False) -> np.ndarray:
    """Fixed 2-D position embedding: half the channels encode the row, half the column (row-major patches)."""
    rows, cols = np.meshgrid(np.arange(grid_size, dtype=np.float64), np.arange(grid_size, dtype=np.float64),
                             indexing="ij")
    embedding = np.concatenate([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], axis=1)
    if cls_token:
        embedding = np.concatenate([np.zeros([1, dim]), embedding], axis=0)
    return embedding


class MaskedAutoencoderViT(nn.Module):
    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=1024, depth=24, num_heads=16,
                 decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4.0,
                 norm_layer=partial(nn.LayerNorm, eps=1e-6), norm_pix_loss=False):
        super().__init__()
        self.in_chans = in_chans
        self.norm_pix_loss = norm_pix_loss

        # encoder
        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList([
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer) for _ in range(depth)])
        self.norm = norm_layer(embed_dim)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, decoder_embed_dim),
                                              requires_grad=False)
        self.decoder_blocks = nn.ModuleList([
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)

        self.initialize_weights()

    def initialize_weights(self):
        grid = int(self.patch_embed.num_patches**0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.pos_embed.shape[-1], grid, True)).float()[None])
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(sincos_2d(self.decoder_pos_embed.shape[-1], grid, True)).float()[None])
        # patch embedding initialised like a linear layer (xavier over the flattened kernel)
        weight = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(weight.view([weight.shape[0], -1]))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.constant_(module.bias, 0)
        elif isinstance(module, nn.LayerNorm):
            nn.init.constant_(module.bias, 0)
            nn.init.constant_(module.weight, 1.0)

    @property
    def patch_size(self) -> int:
        return self.patch_embed.patch_size[0]

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """[N, C, H, W] -> [N, L, p*p*C], each patch flattened row by row with channels last."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[N, L, p*p*C] -> [N, C, H, W]."""
        p, c = self.patch_size, self.in_chans
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    @staticmethod
    def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        """Keep the patches with the smallest noise; mask is 1 where a patch is hidden (in original order)."""
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        if noise is None:
            noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        x_masked = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).repeat(1, 1, dim))
        mask = torch.ones([n, length], device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return x_masked, mask, ids_restore

    def forward_encoder(self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise)
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(x)
        mask_tokens = self.mask_token.repeat(x.shape[0], ids_restore.shape[1] + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # visible patches, then mask tokens
        x_ = torch.gather(x_, dim=1, index=ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))  # unshuffle
        x = torch.cat([x[:, :1, :], x_], dim=1)
        x = x + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        x = self.decoder_norm(x)
        return self.decoder_pred(x)[:, 1:, :]  # drop the class token

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """What the decoder predicts: pixels per patch, normalised per patch when norm_pix_loss is set."""
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the masked patches only (zero when nothing is masked)."""
        loss = ((pred - self.target(imgs)) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum().clamp(min=1)

    def forward(self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask


class MaskedAutoencoderViTFullEncoder(MaskedAutoencoderViT):
    """The paper's ablation: the encoder sees every patch, with mask tokens in place of hidden ones.

    Used only to measure what encoding visible patches alone saves (bench/); it shares the state dict.
    """

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs)
        _, mask, _ = self.random_masking(x, mask_ratio, noise)
        x = x * (1 - mask).unsqueeze(-1) + self.pos_embed[:, 1:, :]  # a zero mask token: cost is what counts
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        for block in self.blocks:
            x = block(x)
        ids_restore = torch.arange(x.shape[1] - 1, device=x.device).expand(x.shape[0], -1)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x) + self.decoder_pos_embed
        for block in self.decoder_blocks:
            x = block(x)
        return self.decoder_pred(self.decoder_norm(x))[:, 1:, :]


def build(preset: str, img_size: int, patch_size: int, in_chans: int, norm_pix_loss: bool = True,
          full_encoder: bool = False) -> MaskedAutoencoderViT:
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    cls = MaskedAutoencoderViTFullEncoder if full_encoder else MaskedAutoencoderViT
    return cls(img_size=img_size, patch_size=patch_size, in_chans=in_chans, norm_pix_loss=norm_pix_loss,
               **PRESETS[preset])


def load_reference_checkpoint(model: MaskedAutoencoderViT, checkpoint: str | Path | dict) -> dict[str, list[str]]:
    """Load facebookresearch/mae weights: a full MAE state dict, or an encoder-only release checkpoint.

    Returns which of the model's keys the checkpoint lacked (e.g. the decoder, for the released
    encoders) and which checkpoint keys the model does not have (e.g. a fine-tuning head); shapes must
    match for every key both have.
    """
    state = torch.load(checkpoint, map_location="cpu", weights_only=True) if isinstance(checkpoint, (str, Path)) \
        else checkpoint
    state = state.get("model", state)
    own = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and v.shape != own[k].shape]
    if wrong:
        raise ValueError(f"checkpoint shapes differ from the model: {'; '.join(wrong[:5])}")
    result = model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    report = {"missing": sorted(result.missing_keys), "unexpected": sorted(set(state) - set(own))}
    if report["missing"]:
        log.info("checkpoint lacks %d keys (%s...)", len(report["missing"]), ", ".join(report["missing"][:3]))
    return report


class MAEEncoder(nn.Module):
    """The encoder alone (the part MAE releases): whole images in, one feature vector per image out.

    Its state-dict keys are those of the released encoder checkpoints (cls_token, pos_embed,
    patch_embed.*, blocks.*, norm.*). It shares parameters with the MAE it was made from. `pool` picks
    the feature (one of POOLS): the class token ("cls"), the mean of the patch tokens ("avg", the global
    pooling the reference uses for fine-tuning), or the mean patch token after every block, concatenated
    ("blocks", the last one normalised, so it ends with "avg"): a shallow encoder keeps much of what a linear
    probe reads in its earlier blocks, which is why DINO's linear evaluation concatenates several blocks. It
    has no default: the logged encoder, evaluation and the audits all take it from `evaluate.pool`, so what
    is published is what was audited.
    """

    def __init__(self, mae: MaskedAutoencoderViT, pool: str):
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, not {pool!r}")
        self.pool = pool
        self.patch_embed, self.cls_token, self.pos_embed = mae.patch_embed, mae.cls_token, mae.pos_embed
        self.blocks, self.norm = mae.blocks, mae.norm

    @property
    def width(self) -> int:
        """The length of the feature vector each image gets."""
        return self.cls_token.shape[-1] * (len(self.blocks) if self.pool == "blocks" else 1)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]
        cls_token = self.cls_token + self.pos_embed[:, :1, :]
        x = torch.cat((cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        means = []
        for block in self.blocks:
            x = block(x)
            means.append(x[:, 1:].mean(dim=1))
        x = self.norm(x)
        if self.pool == "cls":
            return x[:, 0]
        means[-1] = x[:, 1:].mean(dim=1)  # the last block's after the final norm: "avg"
        return torch.cat(means, dim=1) if self.pool == "blocks" else means[-1]
