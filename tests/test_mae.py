"""The model against the facebookresearch/mae layout and semantics.

`reference_loss` below re-derives the reference forward pass in plain torch from a state dict, with no
timm and none of pipeline.mae, so agreement means the same weights give the same loss.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.mae import PRESETS, MAEEncoder, MaskedAutoencoderViT, build, load_reference_checkpoint, sincos_2d

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`


def reference_layout(img=224, patch=16, chans=3, dim=768, depth=12, dec=512, dec_depth=8) -> dict[str, tuple]:
    """Keys and shapes of facebookresearch/mae MaskedAutoencoderViT (mlp_ratio 4, qkv bias on)."""
    tokens = (img // patch) ** 2 + 1

    def block(prefix: str, d: int) -> dict[str, tuple]:
        return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
                f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
                f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
                f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
                f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
                f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}

    layout = {"cls_token": (1, 1, dim), "pos_embed": (1, tokens, dim),
              "patch_embed.proj.weight": (dim, chans, patch, patch), "patch_embed.proj.bias": (dim,),
              "norm.weight": (dim,), "norm.bias": (dim,),
              "decoder_embed.weight": (dec, dim), "decoder_embed.bias": (dec,), "mask_token": (1, 1, dec),
              "decoder_pos_embed": (1, tokens, dec), "decoder_norm.weight": (dec,), "decoder_norm.bias": (dec,),
              "decoder_pred.weight": (patch * patch * chans, dec), "decoder_pred.bias": (patch * patch * chans,)}
    for i in range(depth):
        layout.update(block(f"blocks.{i}", dim))
    for i in range(dec_depth):
        layout.update(block(f"decoder_blocks.{i}", dec))
    return layout


def test_base_state_dict_matches_the_reference_layout():
    model = build("base", 224, 16, 3)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference_layout()


def test_one_channel_and_small_presets_keep_the_layout():
    model = build("tiny", 32, 4, 1)
    t = PRESETS["tiny"]
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == reference_layout(
        32, 4, 1, t["embed_dim"], t["depth"], t["decoder_embed_dim"], t["decoder_depth"])


def test_position_embedding_is_the_reference_sincos():
    # the reference: first half encodes the column (w), second half the row (h), cls row zeros
    embedding = sincos_2d(8, 3, cls_token=True)
    assert embedding.shape == (10, 8) and (embedding[0] == 0).all()
    row, col = 1, 2
    patch = embedding[1 + row * 3 + col]
    omega = [1.0, 1.0 / 100.0]  # 1 / 10000 ** (arange(2) / 2)
    expected = [math.sin(col * omega[0]), math.sin(col * omega[1]), math.cos(col * omega[0]), math.cos(col * omega[1]),
                math.sin(row * omega[0]), math.sin(row * omega[1]), math.cos(row * omega[0]), math.cos(row * omega[1])]
    assert patch == pytest.approx(expected)


def _attention(x, state, prefix, heads):
    n, length, dim = x.shape
    qkv = F.linear(x, state[f"{prefix}.attn.qkv.weight"], state[f"{prefix}.attn.qkv.bias"])
    q, k, v = qkv.reshape(n, length, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
    weights = (q @ k.transpose(-2, -1) * (dim // heads) ** -0.5).softmax(dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(n, length, dim)
    return F.linear(out, state[f"{prefix}.attn.proj.weight"], state[f"{prefix}.attn.proj.bias"])


def _block(x, state, prefix, heads):
    def norm(y, name):
        return F.layer_norm(y, y.shape[-1:], state[f"{prefix}.{name}.weight"], state[f"{prefix}.{name}.bias"], 1e-6)

    x = x + _attention(norm(x, "norm1"), state, prefix, heads)
    hidden = F.gelu(F.linear(norm(x, "norm2"), state[f"{prefix}.mlp.fc1.weight"], state[f"{prefix}.mlp.fc1.bias"]))
    return x + F.linear(hidden, state[f"{prefix}.mlp.fc2.weight"], state[f"{prefix}.mlp.fc2.bias"])


def reference_loss(state, imgs, noise, patch, heads, dec_heads, depth, dec_depth, mask_ratio=0.75, norm_pix=True):
    """The reference forward pass, written out with functional torch."""
    n, c, h, w = imgs.shape
    x = F.conv2d(imgs, state["patch_embed.proj.weight"], state["patch_embed.proj.bias"], stride=patch)
    x = x.flatten(2).transpose(1, 2) + state["pos_embed"][:, 1:]
    length = x.shape[1]
    keep = int(length * (1 - mask_ratio))
    shuffle = noise.argsort(dim=1)
    restore = shuffle.argsort(dim=1)
    x = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, x.shape[-1]))
    mask = torch.ones(n, length)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, restore)
    x = torch.cat([(state["cls_token"] + state["pos_embed"][:, :1]).expand(n, -1, -1), x], dim=1)
    for i in range(depth):
        x = _block(x, state, f"blocks.{i}", heads)
    x = F.layer_norm(x, x.shape[-1:], state["norm.weight"], state["norm.bias"], 1e-6)
    x = F.linear(x, state["decoder_embed.weight"], state["decoder_embed.bias"])
    tokens = torch.cat([x[:, 1:], state["mask_token"].expand(n, length - keep, -1)], dim=1)
    tokens = torch.gather(tokens, 1, restore[:, :, None].expand(-1, -1, x.shape[-1]))
    x = torch.cat([x[:, :1], tokens], dim=1) + state["decoder_pos_embed"]
    for i in range(dec_depth):
        x = _block(x, state, f"decoder_blocks.{i}", dec_heads)
    x = F.layer_norm(x, x.shape[-1:], state["decoder_norm.weight"], state["decoder_norm.bias"], 1e-6)
    pred = F.linear(x, state["decoder_pred.weight"], state["decoder_pred.bias"])[:, 1:]
    target = imgs.reshape(n, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 3, 5, 1)
    target = target.reshape(n, length, patch * patch * c)
    if norm_pix:
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    loss = ((pred - target) ** 2).mean(-1)
    return (loss * mask).sum() / mask.sum(), mask


@pytest.mark.parametrize("channels, norm_pix", [(3, True), (1, False)])
def test_same_weights_images_and_noise_give_the_reference_loss(channels, norm_pix):
    torch.manual_seed(0)
    model = build("micro", 32, 4, channels, norm_pix_loss=norm_pix).eval()
    with torch.no_grad():  # move the LayerNorms off their identity initialisation so they count
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    imgs = torch.randn(3, channels, 32, 32)
    noise = torch.rand(3, 64)
    p = PRESETS["micro"]
    with torch.no_grad():
        loss, pred, mask = model(imgs, 0.75, noise)
        expected, expected_mask = reference_loss(model.state_dict(), imgs, noise, 4, p["num_heads"],
                                                 p["decoder_num_heads"], p["depth"], p["decoder_depth"],
                                                 norm_pix=norm_pix)
    assert torch.equal(mask, expected_mask)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)


def test_masking_with_noise_is_deterministic_and_keeps_the_lowest_noise():
    model = build("micro", 32, 4, 3)
    x = torch.randn(2, 64, 8)
    noise = torch.rand(2, 64)
    kept, mask, restore = model.random_masking(x, 0.75, noise)
    again = model.random_masking(x, 0.75, noise)
    assert torch.equal(kept, again[0]) and torch.equal(mask, again[1])
    assert (mask.sum(dim=1) == 48).all()
    lowest = noise.argsort(dim=1)[:, :16]
    assert torch.equal(mask.gather(1, lowest), torch.zeros(2, 16))
    assert torch.equal(kept, x.gather(1, lowest[:, :, None].expand(-1, -1, 8)))


def test_loss_counts_only_masked_patches():
    model = build("micro", 32, 4, 3)
    imgs = torch.randn(2, 3, 32, 32)
    _, pred, mask = model(imgs, 0.75, torch.rand(2, 64))
    target = model.target(imgs)
    perfect_where_masked = torch.where(mask.bool().unsqueeze(-1), target, target + 100.0)
    assert float(model.forward_loss(imgs, perfect_where_masked, mask)) == pytest.approx(0.0, abs=1e-10)
    wrong_where_masked = torch.where(mask.bool().unsqueeze(-1), target + 1.0, target)
    assert float(model.forward_loss(imgs, wrong_where_masked, mask)) == pytest.approx(1.0)


def test_mask_ratio_zero_is_the_feature_path():
    model = build("micro", 32, 4, 3).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        loss, _, mask = model(imgs, mask_ratio=0.0)
    assert float(loss) == 0.0 and mask.sum() == 0
    latent, _, _ = model.forward_encoder(imgs, 0.0, torch.arange(64.0).expand(2, -1))  # identity order
    with torch.no_grad():
        assert torch.allclose(MAEEncoder(model, "cls")(imgs), latent[:, 0], atol=1e-6)


def test_reference_checkpoints_load_full_and_encoder_only(tmp_path):
    source = build("micro", 32, 4, 3)
    full = tmp_path / "full.pth"
    torch.save({"model": source.state_dict()}, full)
    target = build("micro", 32, 4, 3)
    assert load_reference_checkpoint(target, full) == {"missing": [], "unexpected": []}
    assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    target.load_state_dict(torch.load(full)["model"], strict=True)

    encoder_only = {**MAEEncoder(source, "avg").state_dict(), "head.weight": torch.zeros(10, 96)}
    fresh = build("micro", 32, 4, 3)
    report = load_reference_checkpoint(fresh, encoder_only)
    assert report["unexpected"] == ["head.weight"]
    assert set(report["missing"]) == {k for k in fresh.state_dict() if k.startswith(("decoder", "mask_token"))}
    assert torch.equal(fresh.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    with pytest.raises(ValueError, match="shapes differ"):
        load_reference_checkpoint(build("micro", 32, 8, 3), full)


def test_visible_only_encoder_agrees_with_the_full_encoder_ablation_on_shapes():
    imgs = torch.randn(2, 3, 32, 32)
    for full in (False, True):
        loss, pred, mask = build("micro", 32, 4, 3, full_encoder=full)(imgs, 0.75, torch.rand(2, 64))
        assert pred.shape == (2, 64, 48) and mask.sum() == 96 and torch.isfinite(loss)
    assert issubclass(type(build("micro", 32, 4, 3, full_encoder=True)), MaskedAutoencoderViT)
