"""Parallel ingest: images per second and peak memory of an image folder by engine and worker count.

    python bench/ingest_throughput.py 50000                 # local 1 and 2 workers, ray with 2 CPUs
    python bench/ingest_throughput.py 5000 --runs local:1 local:2

Writes N 64x64 PNGs (bench/ingest_folder.py's folder) once, then for each run ingests it to 32x32x3 with
`python -m pipeline ingest` in a child process (ingest.engine and ingest.workers set in its params.yaml). Reports
wall seconds (start-up included), images per second, CPU seconds of the whole tree (`os.wait4`: the stage and the
processes it waited for) and of the stage's own process (the writer and the source listing, sampled), the stage's
peak RSS (`os.wait4`: the largest of the processes it waited for, so with a pool also a worker's) and the peak of
the summed RSS of the whole process tree (pool workers, or the local Ray's processes), sampled every 0.2 s: an upper
bound, as pages shared between processes count once per process. Every run's outputs must be byte-identical.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ingest_folder import make_folder  # noqa: E402  (bench/ is not a package)

ROOT = Path(__file__).resolve().parents[1]


def tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


def outputs_digest(folder: Path) -> str:
    """Over every output file but provenance.json's code digest (the same code ran every time anyway)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "provenance.json":
            data = json.dumps({**json.loads(data), "code": None}, sort_keys=True).encode()
        digest.update(path.relative_to(folder).as_posix().encode() + b"\0" + data)
    return digest.hexdigest()


def measure(space: Path, engine: str, workers: int) -> dict:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["datasets"] = {"photos": {"kind": "image_folder", "source": "raw", "image_size": 32, "channels": 3}}
    params["ingest"].update(engine=engine, workers=workers)
    (space / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "pipeline", "ingest", "photos"], cwd=space, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak, writer_cpu, done = [0], [0.0], threading.Event()

    def sample() -> None:
        watched = psutil.Process(child.pid)
        while not done.wait(0.2):
            try:
                peak[0] = max(peak[0], tree_rss(watched))
                times = watched.cpu_times()
                writer_cpu[0] = times.user + times.system
            except psutil.Error:
                return

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stderr = child.stderr.read()
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if status != 0:
        raise SystemExit(stderr.decode())
    out = space / "data" / "ingested" / "photos"
    counts = json.loads((out / "provenance.json").read_text())["counts"]
    digest = outputs_digest(out)
    shutil.rmtree(space / "data")
    return {"engine": engine, "workers": workers, "images": counts["read"], "accepted": counts["accepted"],
            "seconds": round(seconds, 1), "images_per_second": round(counts["read"] / seconds),
            "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1), "writer_cpu_seconds": round(writer_cpu[0], 1),
            "peak_rss_mib": round(usage.ru_maxrss / 1024), "tree_peak_rss_mib": round(peak[0] / 2**20),
            "outputs": digest[:16]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", type=int, help="number of images in the folder")
    parser.add_argument("--runs", nargs="+", default=["local:1", "local:2", "ray:2"],
                        help="engine:workers, in order (default: local:1 local:2 ray:2)")
    args = parser.parse_args()
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
               f"load average at start {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as work:
        space = Path(work)
        make_folder(space / "raw", args.images)
        shutil.copytree(ROOT / "data_cards", space / "data_cards")
        shutil.copy(ROOT / "data_cards" / "examples" / "photos.yaml", space / "data_cards" / "photos.yaml")
        digests = set()
        for run in args.runs:
            engine, workers = run.split(":")
            result = measure(space, engine, int(workers))
            digests.add(result["outputs"])
            print(json.dumps({**result, "machine": machine}), flush=True)
        if len(digests) != 1:
            raise SystemExit(f"outputs differ between runs: {sorted(digests)}")


if __name__ == "__main__":
    main()
