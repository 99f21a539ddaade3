"""MAE training throughput: the model's training step alone, and the real training loop reading a split from disk.

    python bench/train_throughput.py [--preset micro --image-size 32 --patch-size 4 --batch-size 128]
    python bench/train_throughput.py --loop [--preset base --image-size 224 --patch-size 16 --batch-size 256
                                             --images 20480 --epochs 3 --workers 8 --compile --bf16]

Without --loop: visible-only encoder vs the full-encoder ablation, fp32 vs bf16. Each configuration runs in its
own child process (so its peak RSS is its own): a few warm-up steps, then timed AdamW training steps on random
images at mask ratio 0.75. Reports images per second, model FLOPs per second (forward + backward, counted by
torch.utils.flop_counter) as a fraction of this machine's fp32 matrix-multiply peak (measured here with torch.mm),
peak RSS, and on a GPU (`--device cuda`, the default where one is present) the peak GPU memory.

With --loop: what the pipeline reaches of the model's rate. `--images` random uint8 images are written as a
.npy split and trained on by `pipeline.train.train` (memory-mapped, DataLoader workers, pinned memory, uint8 to the
device, crop and flip and normalisation there, fused AdamW, losses read every `log_every` steps) for `--epochs`
epochs; its last epoch's images per second is set beside the model-only step measured in the same process with
the same settings (bf16 autocast, torch.compile, fused AdamW, images already on the device). FLOP/s are reported as
a share of the bf16 (or, without --bf16, fp32) matrix-multiply peak measured here. It also reports what the data
path alone delivers (loader, copy to the device, augmentation; no model).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch.utils.flop_counter import FlopCounterMode

from pipeline.mae import build


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, size: int = 2048, repeats: int = 10, dtype: torch.dtype = torch.float32) -> float:
    """Matrix-multiply rate measured here (fp32 with TF32 off: plain fp32, as the model trains by default)."""
    size = 8192 if device == "cuda" else size
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    torch.mm(a, b)
    sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def one(args) -> dict:
    torch.manual_seed(0)
    model = build(args.preset, args.image_size, args.patch_size, 3, full_encoder=args.full_encoder).to(args.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95))
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=args.device)
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.bf16)

    def step():
        with autocast:
            loss, _, _ = model(images, 0.75)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss, _, _ = model(images, 0.75)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops = counter.get_total_flops()
    for _ in range(3):
        step()
    sync(args.device)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    seconds = (time.perf_counter() - start) / args.steps
    gpu_memory = {"peak_gpu_memory_mib": round(torch.cuda.max_memory_allocated() / 2**20)} if args.device == "cuda" else {}
    return {**gpu_memory, "encoder": "full (mask tokens)" if args.full_encoder else "visible only",
            "precision": "bf16 autocast" if args.bf16 else "fp32",
            "images_per_second": round(args.batch_size / seconds, 1), "gflop_per_step": round(flops / 1e9, 2),
            "gflops": round(flops / seconds / 1e9, 1)}


def write_split(path: Path, count: int, size: int, chunk: int = 1024) -> None:
    """`count` random uint8 images as an .npy split, written in chunks (never whole in memory)."""
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, size, size, 3))
    for start in range(0, count, chunk):
        out[start:start + chunk] = rng.integers(0, 256, out[start:start + chunk].shape, dtype=np.uint8)
    out.flush()


def loop(args) -> None:
    """The real training loop against the model-only step, same settings, same process."""
    from pipeline.data import Draws, SplitPixels
    from pipeline.normalisation import Normalisation
    from pipeline.params import PretrainSettings
    from pipeline.train import param_groups, train, use_bf16, use_compile

    device = torch.device(args.device)
    base = yaml.safe_load(Path("params.yaml").read_text())["pretrain"]
    settings = PretrainSettings.model_validate({
        **base, "preset": args.preset, "patch_size": args.patch_size, "batch_size": args.batch_size,
        "epochs": args.epochs, "warmup_epochs": 0, "workers": args.workers, "bf16": args.bf16,
        "compile": args.compile, "threads": args.threads, "checkpoint_every": 1000, "checkpoint_every_steps": None,
        "augment": {"flip": True, "random_resized_crop": True},
        **({"mask_ratio": args.mask_ratio} if args.mask_ratio is not None else {})})
    bf16, compiled = use_bf16(settings, device), use_compile(settings, device)
    peak = matmul_peak(args.device, dtype=torch.bfloat16 if bf16 else torch.float32)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    if device.type == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    print(json.dumps({"machine": machine, "model": f"{args.preset}, {args.image_size}px, patch {args.patch_size}, "
                      f"batch {args.batch_size}, mask ratio {settings.mask_ratio}", "bf16": bf16, "compile": compiled, "workers": args.workers,
                      f"{'bf16' if bf16 else 'fp32'}_matmul_peak_tflops": round(peak / 1e12, 1)}), flush=True)

    # the model-only step: images and noise already on the device
    torch.manual_seed(0)
    model = build(args.preset, args.image_size, args.patch_size, 3).to(device)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-4, betas=(0.9, 0.95), fused=device.type == "cuda")
    images = torch.randn(args.batch_size, 3, args.image_size, args.image_size, device=device)
    noise = torch.rand(args.batch_size, model.patch_embed.num_patches, device=device)
    forward = torch.compile(model) if compiled else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)

    def step():
        with autocast:
            loss, _, _ = forward(images, settings.mask_ratio, noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:
        with autocast:
            loss, _, _ = model(images, settings.mask_ratio, noise)
        loss.backward()
    optimizer.zero_grad(set_to_none=True)
    flops_per_image = counter.get_total_flops() / args.batch_size
    for _ in range(5):
        step()
    sync(args.device)
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync(args.device)
    model_rate = args.batch_size * args.steps / (time.perf_counter() - start)
    del model, optimizer, forward

    with tempfile.TemporaryDirectory(dir=args.scratch) as folder:
        split = Path(folder) / "train.npy"
        written = time.perf_counter()
        write_split(split, args.images, args.image_size)
        log_line = {"split": f"{args.images} images, {split.stat().st_size / 2**30:.2f} GiB, written in "
                             f"{time.perf_counter() - written:.0f} s"}
        print(json.dumps(log_line), flush=True)
        data = SplitPixels(split, Draws(settings.seed, args.patch_size, settings.augment))
        normalisation = Normalisation.fit(data.pixels)
        print(json.dumps({"measured": "data path alone (loader, copy, augmentation; no model)",
                          "images_per_second": round(data_rate(data, normalisation, settings, device), 1)}),
              flush=True)
        report("model-only step", model_rate, flops_per_image, peak)
        for log_every in args.log_every or [settings.log_every]:
            torch.manual_seed(0)
            model = build(args.preset, args.image_size, args.patch_size, 3).to(device)
            run = settings.model_copy(update={"log_every": log_every})
            started = time.perf_counter()
            state = train(model, data, normalisation, run, Path(folder) / f"checkpoint-{log_every}.pt", "bench")
            wall = time.perf_counter() - started
            loop_rate = state.history[-1]["images_per_second"]
            report(f"train loop (last epoch), log_every {log_every}", loop_rate, flops_per_image, peak)
            print(json.dumps({"loop_over_model": round(loop_rate / model_rate, 3), "gflop_per_image": round(
                flops_per_image / 1e9, 2), "epochs": [round(h["images_per_second"], 1) for h in state.history],
                "final_train_loss": round(state.history[-1]["train_loss"], 4),
                "loop_wall_seconds": round(wall, 1)}), flush=True)


def report(name: str, rate: float, flops_per_image: float, peak: float) -> None:
    print(json.dumps({"measured": name, "images_per_second": round(rate, 1),
                      "tflops": round(rate * flops_per_image / 1e12, 3),
                      "share_of_peak": round(rate * flops_per_image / peak, 3)}), flush=True)


def data_rate(data, normalisation, settings, device: torch.device) -> float:
    """Images per second through the training loop's data path alone, over one epoch, read as the loop reads it."""
    from pipeline.data import Batches, Epochs, loader, on_device, training_input

    batches = Batches(len(data), settings.batch_size, shuffle=True, seed=settings.seed)
    prepared = on_device(loader(data, Epochs(batches, 0, 1), settings.workers, device, settings.prefetch),
                         lambda batch: training_input(batch, normalisation, device), device)
    started, seen = time.perf_counter(), 0
    for images, _ in prepared:
        seen += len(images)
    sync(device.type)
    return seen / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--loop", action="store_true", help="the training loop against the model-only step")
    parser.add_argument("--images", type=int, default=20480, help="--loop: images in the split")
    parser.add_argument("--epochs", type=int, default=3, help="--loop: epochs (the last one is timed)")
    parser.add_argument("--workers", type=int, default=min(8, max(1, (os.cpu_count() or 2) - 2)),
                        help="--loop: DataLoader workers")
    parser.add_argument("--mask-ratio", type=float, default=None,
                        help="--loop: mask ratio (default: params.yaml's pretrain.mask_ratio)")
    parser.add_argument("--log-every", type=int, nargs="+", default=None,
                        help="--loop: steps between loss reads, one loop per value (default: params.yaml's)")
    parser.add_argument("--compile", action="store_true", help="--loop: torch.compile the step")
    parser.add_argument("--scratch", default=None, help="--loop: folder for the split (default: the temp folder)")
    parser.add_argument("--full-encoder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help="--loop: bf16 autocast")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.loop:
        loop(args)
        return
    if args.child:
        print(json.dumps(one(args)))
        return
    peak = matmul_peak(args.device)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} threads"
    if args.device == "cuda":
        machine += f", {torch.cuda.get_device_name()}"
    print(json.dumps({"machine": machine, "fp32_matmul_peak_gflops": round(peak / 1e9, 1),
                      "model": f"{args.preset}, {args.image_size}px, patch {args.patch_size}, batch {args.batch_size}"}))
    base = [sys.executable, __file__, "--child", *sys.argv[1:]]
    for extra in ([], ["--full-encoder"], ["--bf16"], ["--full-encoder", "--bf16"]):
        child = subprocess.Popen(base + extra, stdout=subprocess.PIPE, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        result = json.loads(child.stdout.read())
        result["fraction_of_fp32_peak"] = round(result["gflops"] * 1e9 / peak, 3)
        result["peak_rss_mib"] = round(usage.ru_maxrss / 1024)
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
