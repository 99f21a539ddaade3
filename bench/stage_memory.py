"""Peak memory of pretrain and evaluate as the collection grows: does either hold a whole split?

    nice -n 10 python bench/stage_memory.py 10000 100000 [--image-size 64 --scratch /tmp]

For each size: the synthetic source at that many images of `--image-size` pixels is ingested, validated and
split in a folder of its own; then `python -m pipeline pretrain` (one epoch of the micro model, patch 8, batch
256) and `python -m pipeline evaluate` each run under `/usr/bin/time -v`, which reports the child's peak RSS and
wall time (one torch thread each: the numbers are about memory, and this machine's two cores are shared). MLflow
tracks to a sqlite file in the folder. Flat memory: the larger run's peaks within 15% of the smaller's; what
remains is per record (split tables, the batch permutation, per-sample errors and features).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def timed(args: list[str], cwd: Path, env: dict) -> dict:
    """Run `python -m pipeline <args>` under /usr/bin/time -v: its peak RSS (MiB) and wall seconds."""
    result = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env,
                            capture_output=True, text=True)
    if result.returncode:
        raise SystemExit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr).group(1))
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", result.stderr).group(1)
    seconds = sum(float(part) * 60 ** i for i, part in enumerate(reversed(wall.split(":"))))
    return {"peak_rss_mib": round(rss / 1024), "wall_seconds": round(seconds, 1)}


def measure(count: int, image_size: int, work: Path) -> dict:
    space = work / f"n{count}"
    shutil.copytree(ROOT / "data_cards", space / "data_cards")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"] = {"synthetic": {**params["datasets"]["synthetic"], "num_images": count,
                                       "image_size": image_size}}
    params["pretrain"].update(epochs=1, warmup_epochs=0, patch_size=8, batch_size=256, threads=1)
    params["evaluate"].update(threads=1)
    (space / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": f"sqlite:///{space / 'mlflow.db'}"}
    started = time.perf_counter()
    for args in (["ingest", "synthetic"], ["validate"], ["prepare"]):
        timed(args, space, env)
    sizes = json.loads((space / "data" / "prepared" / "split_sizes.json").read_text())["synthetic"]
    row = {"images": count, "image_size": image_size, "splits": {k: v["total"] for k, v in sizes.items()},
           "prepared_seconds": round(time.perf_counter() - started)}
    for stage in ("pretrain", "evaluate"):
        row[stage] = timed([stage], space, env)
    shutil.rmtree(space)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("counts", type=int, nargs="+")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--scratch", default=None, help="folder for the workspaces (default: the temp folder)")
    args = parser.parse_args()
    print(json.dumps({"machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"}))
    with tempfile.TemporaryDirectory(dir=args.scratch) as work:
        for count in args.counts:
            print(json.dumps(measure(count, args.image_size, Path(work))), flush=True)


if __name__ == "__main__":
    main()
