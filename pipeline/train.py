"""MAE pretraining: the training loop in one place, single process or torchrun DDP.

AdamW (betas 0.9, 0.95; no weight decay on biases, norms, tokens and position embeddings), lr =
base_lr x effective batch / 256, per-iteration linear warm-up then half-cycle cosine, gradient
accumulation, optional bf16 autocast. Every random choice (batch order, flips, masking noise) comes
from generators seeded by (seed, epoch), and checkpoints hold model, optimiser, step, epoch and RNG
states, so a run killed at any point and started again ends with the same weights as one that was
never interrupted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import pickle
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from pipeline import PipelineError
from pipeline.mae import MaskedAutoencoderViT
from pipeline.params import PretrainSettings

log = logging.getLogger(__name__)

NO_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")


@dataclass(frozen=True)
class World:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group when launched by torchrun; otherwise a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return World(dist.get_rank(), dist.get_world_size())


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay only weight matrices: biases, norms, tokens and position embeddings are left alone."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name.split(".")[-1] in NO_DECAY else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def learning_rate(step: float, total: int, warmup: float, peak: float, minimum: float) -> float:
    """Linear warm-up to the peak, then half-cycle cosine down to the minimum (per iteration)."""
    if step < warmup:
        return peak * step / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return minimum + (peak - minimum) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def epoch_generators(seed: int, epoch: int) -> tuple[np.random.Generator, torch.Generator]:
    """The randomness of one epoch: batch order and flips (numpy), masking noise (torch)."""
    return np.random.default_rng([seed, epoch]), torch.Generator().manual_seed(seed * 1_000_003 + epoch)


@torch.no_grad()
def masked_losses(model: MaskedAutoencoderViT, images: torch.Tensor, mask_ratio: float, seed: int,
                  batch_size: int = 256) -> tuple[float, float]:
    """Held-out masked-patch loss of the model and of predicting each patch's own mean, on fixed masks."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    total = baseline = 0.0
    count = 0
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size].to(device)
        noise = torch.rand(len(batch), model.patch_embed.num_patches, generator=generator).to(device)
        loss, _, mask = model(batch, mask_ratio, noise)
        target = model.target(batch)
        patch_mean = target.mean(dim=-1, keepdim=True).expand_as(target)
        base = model.forward_loss(batch, patch_mean, mask)
        total += float(loss) * len(batch)
        baseline += float(base) * len(batch)
        count += len(batch)
    return total / count, baseline / count


@dataclass
class State:
    """Everything a resumed run needs to continue exactly where the last checkpoint left it."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    history: list[dict] = field(default_factory=list)
    run_id: str | None = None


def rng_states() -> dict:
    """The global generators' states as tensors and plain values, so a checkpoint loads with weights_only."""
    numpy_state = np.random.get_state(legacy=False)
    numpy_state["state"] = {**numpy_state["state"], "key": numpy_state["state"]["key"].tolist()}
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    np.random.set_state(states["numpy"])
    random.setstate(states["python"])


def save_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: State,
                    fingerprint: str) -> None:
    """Write atomically, so a kill during the write leaves the previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".partial")
    torch.save({
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "epoch": state.epoch, "step": state.step, "history": state.history, "run_id": state.run_id,
        "fingerprint": fingerprint,
        "rng": rng_states(),
    }, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str) -> State | None:
    """Resume from `path` when it belongs to this very configuration and data; otherwise start afresh. It is
    loaded with weights_only, so a planted file can hold only tensors and plain values, never code."""
    if not path.is_file():
        return None
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        log.warning("ignoring %s: it holds more than tensors and plain values (written by an older version?)", path)
        return None
    if checkpoint.get("fingerprint") != fingerprint:
        log.info("ignoring %s: it was written for other params or data", path)
        return None
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    set_rng_states(checkpoint["rng"])
    log.info("resuming from %s after epoch %d", path, checkpoint["epoch"])
    return State(checkpoint["epoch"], checkpoint["step"], checkpoint["history"], checkpoint["run_id"])


def fingerprint(settings: PretrainSettings, model_args: dict, data_digest: str, world_size: int) -> str:
    """What a checkpoint must match to be resumed: params, model, data, world size, and the code that trains (the
    loop, the model and the normalisation of its input)."""
    code = hashlib.sha256()
    for module in (Path(__file__), Path(__file__).with_name("mae.py"), Path(__file__).with_name("normalisation.py")):
        code.update(module.read_bytes())
    payload = json.dumps({"settings": settings.model_dump(mode="json"), "model": model_args, "data": data_digest,
                          "world_size": world_size, "code": code.hexdigest()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def train(model: MaskedAutoencoderViT, images: torch.Tensor, settings: PretrainSettings, checkpoint: Path,
          run_fingerprint: str, world: World = World(), on_start: Callable[[State], None] | None = None,
          on_step: Callable[[int, dict], None] | None = None,
          on_epoch: Callable[[State], None] | None = None) -> State:
    """Train `model` on `images` (normalised [N, C, H, W]); returns the final state with per-epoch history."""
    device = next(model.parameters()).device
    per_step = settings.batch_size * world.size
    steps_per_epoch = len(images) // (per_step * settings.accum_steps)
    if steps_per_epoch == 0:
        raise PipelineError(f"params.yaml: pretrain.batch_size: {len(images)} training images are fewer than one "
                            f"effective batch ({per_step * settings.accum_steps})")
    effective_batch = per_step * settings.accum_steps
    peak_lr = settings.base_lr * effective_batch / 256
    total_steps = settings.epochs * steps_per_epoch
    warmup_steps = settings.warmup_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=peak_lr, betas=(0.9, 0.95))
    state = load_checkpoint(checkpoint, model, optimizer, run_fingerprint) or State()
    if on_start:
        on_start(state)
    ddp = nn.parallel.DistributedDataParallel(model) if world.size > 1 else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if settings.bf16 else nullcontext()

    for epoch in range(state.epoch, settings.epochs):
        model.train()
        order_rng, noise_rng = epoch_generators(settings.seed, epoch)
        order = order_rng.permutation(len(images))
        flips = order_rng.random(len(images)) < 0.5 if settings.flip else np.zeros(len(images), dtype=bool)
        losses, started, seen = [], time.perf_counter(), 0
        bar = tqdm(range(steps_per_epoch * settings.accum_steps), desc=f"epoch {epoch + 1}/{settings.epochs}",
                   unit="batch", disable=not world.main or None, leave=False)
        for micro in bar:
            # every process draws the whole global batch's noise so the stream is the same at any world size
            global_ids = order[micro * per_step:(micro + 1) * per_step]
            noise = torch.rand(per_step, model.patch_embed.num_patches, generator=noise_rng)
            mine = slice(world.rank * settings.batch_size, (world.rank + 1) * settings.batch_size)
            ids = global_ids[mine]
            batch = images[ids]
            flip = torch.from_numpy(flips[ids])
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch).to(device)
            last_micro = (micro + 1) % settings.accum_steps == 0
            # gradients are all-reduced only on the micro-batch that ends an accumulation
            with ddp.no_sync() if world.size > 1 and not last_micro else nullcontext():
                with autocast:
                    loss, _, _ = ddp(batch, settings.mask_ratio, noise[mine].to(device))
                value = loss.item()
                if not math.isfinite(value):
                    raise PipelineError(f"non-finite loss ({value}) at epoch {epoch + 1}, step {state.step + 1}: "
                                        "lower pretrain.base_lr or check the training data")
                (loss / settings.accum_steps).backward()
            losses.append(value)
            seen += len(global_ids)
            if not last_micro:
                continue
            lr = learning_rate(state.step, total_steps, warmup_steps, peak_lr, settings.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            images_per_second = seen / (time.perf_counter() - started)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{images_per_second:.0f}")
            if on_step and world.main:
                on_step(state.step, {"train_loss": float(np.mean(losses[-settings.accum_steps:])), "lr": lr})
        state.epoch = epoch + 1
        state.history.append({"epoch": state.epoch, "train_loss": float(np.mean(losses)),
                              "images_per_second": seen / (time.perf_counter() - started)})
        if world.main:
            log.info("epoch %d/%d: loss %.4f, %.0f images/s", state.epoch, settings.epochs, np.mean(losses),
                     state.history[-1]["images_per_second"])
        if world.main and on_epoch:
            on_epoch(state)
        if world.main and (state.epoch % settings.checkpoint_every == 0 or state.epoch == settings.epochs):
            save_checkpoint(checkpoint, model, optimizer, state, run_fingerprint)
    return state
