"""MAE pretraining: the training loop in one place, single process or torchrun DDP.

AdamW (betas 0.9, 0.95; no weight decay on biases, norms, tokens and position embeddings; fused on CUDA), lr =
base_lr x effective batch / 256, per-iteration linear warm-up then half-cycle cosine, gradient accumulation,
bf16 autocast and torch.compile where they pay (CUDA). The data streams from the split, read by row, through one
DataLoader iterator for the whole run, and on CUDA each next batch is copied and augmented on a side stream while
the current one trains (pipeline.data); nothing waits for the device per step. Every random choice (batch order;
each sample's masking noise, crop and flip) comes from generators seeded by (seed, epoch) and (seed, epoch,
sample), and checkpoints (at epoch ends and every `checkpoint_every_steps` steps) hold model, optimiser, step,
position in the epoch and RNG states, so a run killed at any point and started again ends with the same weights as
one that was never interrupted, whatever the number of loader workers.
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
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from pipeline import PipelineError
from pipeline.data import Batches, Epochs, SplitPixels, loader, model_input, on_device, training_input
from pipeline.mae import MaskedAutoencoderViT
from pipeline.normalisation import Normalisation
from pipeline.params import PretrainSettings

log = logging.getLogger(__name__)

NO_DECAY = ("cls_token", "mask_token", "pos_embed", "decoder_pos_embed")
# settings that change how the data is read or when losses are read, never the weights: not in the fingerprint
WEIGHTLESS = {"workers", "prefetch", "log_every"}


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


@torch.no_grad()
def masked_losses(model: MaskedAutoencoderViT, batches: Iterable[dict], normalisation: Normalisation,
                  mask_ratio: float, seed: int) -> tuple[float, float]:
    """Held-out masked-patch loss of the model and of predicting each patch's own mean, on fixed masks (the same
    for any batch size: one generator draws them batch after batch)."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    total = baseline = torch.zeros((), dtype=torch.float64, device=device)
    count = 0
    for loaded in batches:
        batch = model_input(loaded, normalisation, device)
        noise = torch.rand(len(batch), model.patch_embed.num_patches, generator=generator).to(device)
        loss, _, mask = model(batch, mask_ratio, noise)
        target = model.target(batch)
        patch_mean = target.mean(dim=-1, keepdim=True).expand_as(target)
        total = total + loss.double() * len(batch)
        baseline = baseline + model.forward_loss(batch, patch_mean, mask).double() * len(batch)
        count += len(batch)
    return float(total) / count, float(baseline) / count


@dataclass
class State:
    """Everything a resumed run needs to continue exactly where the last checkpoint left it."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimiser steps completed
    history: list[dict] = field(default_factory=list)
    run_id: str | None = None
    position: int = 0  # micro-batches of epoch `epoch` already trained on (a mid-epoch checkpoint)
    epoch_losses: list[float] = field(default_factory=list)  # their losses, for the epoch's mean


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
        "position": state.position, "epoch_losses": state.epoch_losses, "fingerprint": fingerprint,
        "rng": rng_states(),
    }, tmp)
    os.replace(tmp, path)


def read_checkpoint(path: Path, fingerprint: str) -> dict | None:
    """The checkpoint at `path` when it belongs to this very configuration and data; otherwise None (start afresh).
    It is loaded with weights_only, so a planted file can hold only tensors and plain values, never code."""
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
    log.info("resuming from %s at epoch %d, step %d", path, checkpoint["epoch"] + 1, checkpoint["step"])
    return checkpoint


def resume(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, fingerprint: str,
           world: World) -> State | None:
    """Rank 0 reads the checkpoint and every process takes its state from rank 0: only rank 0 writes checkpoints,
    so on several machines the others have none (or a stale one) in their own folders."""
    checkpoint = read_checkpoint(path, fingerprint) if world.main else None
    if world.size > 1:
        sent = [checkpoint]
        dist.broadcast_object_list(sent, src=0)
        checkpoint = sent[0]
    if checkpoint is None:
        return None
    model.load_state_dict(checkpoint["model"])
    optimizer.load_state_dict(checkpoint["optimizer"])
    set_rng_states(checkpoint["rng"])
    return State(checkpoint["epoch"], checkpoint["step"], checkpoint["history"], checkpoint["run_id"],
                 checkpoint["position"], checkpoint["epoch_losses"])


def fingerprint(settings: PretrainSettings, model_args: dict, data_digest: str, world_size: int) -> str:
    """What a checkpoint must match to be resumed: params, model, data, world size, and the code that trains (the
    loop, the model, the data path and the normalisation of its input). Settings that cannot change the weights
    (how the data is read, how often losses are read) are left out, so a run may resume with more workers."""
    code = hashlib.sha256()
    for name in ("train.py", "mae.py", "data.py", "normalisation.py"):
        code.update(Path(__file__).with_name(name).read_bytes())
    settings_json = settings.model_dump(mode="json", exclude=WEIGHTLESS)
    payload = json.dumps({"settings": settings_json, "model": model_args, "data": data_digest,
                          "world_size": world_size, "code": code.hexdigest()}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def use_bf16(settings: PretrainSettings, device: torch.device) -> bool:
    """auto: on CUDA where the device has bf16; elsewhere it is emulated, and slower than fp32."""
    if settings.bf16 == "auto":
        return device.type == "cuda" and torch.cuda.is_bf16_supported()
    return settings.bf16


def use_compile(settings: PretrainSettings, device: torch.device) -> bool:
    """auto: on CUDA; on a CPU the compile time outweighs what the small default model gains."""
    return device.type == "cuda" if settings.compile == "auto" else settings.compile


def train(model: MaskedAutoencoderViT, data: SplitPixels, normalisation: Normalisation, settings: PretrainSettings,
          checkpoint: Path, run_fingerprint: str, world: World = World(),
          on_start: Callable[[State], None] | None = None, on_step: Callable[[int, dict], None] | None = None,
          on_epoch: Callable[[State], None] | None = None) -> State:
    """Train `model` on the split `data` (its draws give each sample's noise and augmentation); returns the final
    state with per-epoch history.

    Nothing waits for the device per step: losses stay on it and are read every `log_every` steps, at checkpoints
    and at epoch ends, when a non-finite one stops the run, naming its step."""
    device = next(model.parameters()).device
    per_step = settings.batch_size * world.size
    effective_batch = per_step * settings.accum_steps
    steps_per_epoch = len(data) // effective_batch
    if steps_per_epoch == 0:
        raise PipelineError(f"params.yaml: pretrain.batch_size: {len(data)} training images are fewer than one "
                            f"effective batch ({effective_batch})")
    micro_per_epoch = steps_per_epoch * settings.accum_steps
    peak_lr = settings.base_lr * effective_batch / 256
    total_steps = settings.epochs * steps_per_epoch
    warmup_steps = settings.warmup_epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(param_groups(model, settings.weight_decay), lr=peak_lr, betas=(0.9, 0.95),
                                  fused=device.type == "cuda")
    state = resume(checkpoint, model, optimizer, run_fingerprint, world) or State()
    if on_start:
        on_start(state)
    ddp = nn.parallel.DistributedDataParallel(model) if world.size > 1 else model
    forward = torch.compile(ddp) if use_compile(settings, device) else ddp
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(settings, device))
    batches = Batches(len(data), settings.batch_size, shuffle=True, seed=settings.seed, rank=world.rank,
                      world_size=world.size, count=micro_per_epoch)
    requests = Epochs(batches, state.epoch, settings.epochs, state.position)
    loaded = on_device(loader(data, requests, settings.workers, device, settings.prefetch),
                       lambda batch: training_input(batch, normalisation, device), device)
    pending: list[tuple[int, float, list[torch.Tensor]]] = []  # (step, lr, its micro-batch losses) not yet read

    def read(bar) -> None:
        """Wait for the device once, check the pending losses, and hand each step's to on_step."""
        values = torch.stack([loss for _, _, losses in pending for loss in losses]).tolist()
        for (step, lr, _), losses in zip(pending, np.split(np.array(values), len(pending))):
            bad = next((value for value in losses if not math.isfinite(value)), None)
            if bad is not None:
                raise PipelineError(f"non-finite loss ({bad}) at epoch {state.epoch + 1}, step {step}: lower "
                                    "pretrain.base_lr or check the training data")
            state.epoch_losses.extend(losses.tolist())
            if on_step and world.main:
                on_step(step, {"train_loss": float(np.mean(losses)), "lr": lr})
        bar.set_postfix(loss=f"{values[-1]:.4f}")
        pending.clear()

    for epoch in range(state.epoch, settings.epochs):
        model.train()
        started, seen, losses = time.perf_counter(), 0, []
        bar = tqdm(total=micro_per_epoch, initial=state.position, desc=f"epoch {epoch + 1}/{settings.epochs}",
                   unit="batch", disable=not world.main or None, leave=False)
        for micro in range(state.position, micro_per_epoch):
            images, noise = next(loaded)
            last_micro = (micro + 1) % settings.accum_steps == 0
            # gradients are all-reduced only on the micro-batch that ends an accumulation
            with ddp.no_sync() if world.size > 1 and not last_micro else nullcontext():
                with autocast:
                    loss, _, _ = forward(images, settings.mask_ratio, noise)
                (loss / settings.accum_steps).backward()
            losses.append(loss.detach())
            seen += per_step
            bar.update()
            if not last_micro:
                continue
            lr = learning_rate(state.step, total_steps, warmup_steps, peak_lr, settings.min_lr)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.position = micro + 1
            pending.append((state.step, lr, losses))
            losses = []
            ends_epoch = state.position == micro_per_epoch
            mid_checkpoint = bool(settings.checkpoint_every_steps) and not ends_epoch \
                and state.step % settings.checkpoint_every_steps == 0
            if ends_epoch or mid_checkpoint or len(pending) >= settings.log_every:
                read(bar)
            if mid_checkpoint and world.main:
                save_checkpoint(checkpoint, model, optimizer, state, run_fingerprint)
        bar.close()
        state.history.append({"epoch": epoch + 1, "train_loss": float(np.mean(state.epoch_losses)),
                              "images_per_second": seen / (time.perf_counter() - started)})
        state.epoch, state.position, state.epoch_losses = epoch + 1, 0, []
        if world.main:
            log.info("epoch %d/%d: loss %.4f, %.0f images/s", state.epoch, settings.epochs,
                     state.history[-1]["train_loss"], state.history[-1]["images_per_second"])
        if world.main and on_epoch:
            on_epoch(state)
        if world.main and (state.epoch % settings.checkpoint_every == 0 or state.epoch == settings.epochs
                           or (settings.checkpoint_every_steps and state.step % settings.checkpoint_every_steps == 0)):
            save_checkpoint(checkpoint, model, optimizer, state, run_fingerprint)
    return state
