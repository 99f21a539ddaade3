"""MAE training throughput: visible-only encoder vs the full-encoder ablation, fp32 vs bf16.

    python bench/train_throughput.py [--preset micro --image-size 32 --patch-size 4 --batch-size 128]

Each configuration runs in its own child process (so its peak RSS is its own): a few warm-up steps,
then timed AdamW training steps on random images at mask ratio 0.75. Reports images per second, model
FLOPs per second (forward + backward, counted by torch.utils.flop_counter) as a fraction of this
machine's fp32 matrix-multiply peak (measured here with torch.mm), peak RSS, and on a GPU
(`--device cuda`, the default where one is present) the peak GPU memory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.mae import build


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: str, size: int = 2048, repeats: int = 10) -> float:
    """fp32 matrix-multiply rate measured here (TF32 off: plain fp32, as the model trains by default)."""
    size = 8192 if device == "cuda" else size
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--full-encoder", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--bf16", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
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
