"""Ingest throughput and peak memory on a folder of small images.

    python bench/ingest_folder.py 5000 50000

For each size: writes that many 64x64 PNGs (plus metadata.csv) into a temporary folder, runs
`python -m pipeline ingest` on it in a child process, and reports images per second and the child's
peak RSS. Flat memory means the peak RSS barely moves between sizes.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def make_folder(folder: Path, count: int) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    base = np.linspace(0, 255, 64, dtype=np.float64)
    with (folder / "metadata.csv").open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "photographer", "taken_at", "license", "consent", "camera", "age_band", "label"])
        for i in range(count):
            noise = rng.integers(0, 40, size=(64, 64, 3))
            pixels = np.clip(base[None, :, None] * rng.uniform(0.3, 1, 3) + noise, 0, 255).astype(np.uint8)
            name = f"{i // 1000:03d}/img-{i:06d}.png"
            (folder / name).parent.mkdir(exist_ok=True)
            Image.fromarray(pixels).save(folder / name, compress_level=1)
            writer.writerow([name, f"p{i % 97}", "2025-05-01", "CC-BY-4.0", "granted",
                             "phone" if i % 5 else "dslr", ("under_30", "30_to_60", "over_60")[i % 3],
                             ("indoor", "outdoor")[i % 2]])


def measure(count: int, work: Path) -> dict:
    space = work / f"n{count}"
    make_folder(space / "raw", count)
    shutil.copytree(ROOT / "data_cards", space / "data_cards")
    shutil.copy(ROOT / "data_cards" / "examples" / "photos.yaml", space / "data_cards" / "photos.yaml")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"] = {"photos": {"kind": "image_folder", "source": "raw", "image_size": 32, "channels": 3}}
    (space / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "pipeline", "ingest", "photos"], cwd=space, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    if status != 0:
        raise SystemExit(child.stderr.read().decode())
    provenance = json.loads((space / "data" / "ingested" / "photos" / "provenance.json").read_text())
    shutil.rmtree(space)
    return {"images": count, "accepted": provenance["counts"]["accepted"], "seconds": round(seconds, 1),
            "images_per_second": round(count / seconds), "peak_rss_mib": round(usage.ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sizes", nargs="+", type=int, help="numbers of images to ingest")
    args = parser.parse_args()
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    with tempfile.TemporaryDirectory() as work:
        for count in args.sizes:
            print(json.dumps({**measure(count, Path(work)), "machine": machine}), flush=True)


if __name__ == "__main__":
    main()
