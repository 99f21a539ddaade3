"""Where ingest's per-record work (pipeline.ingest_record.judge) runs: in the stage's own process, a local process
pool, or Ray Data on a local Ray or a cluster.

Every engine takes the source's items in order and hands back their Judged records in the same order, with a
bounded number in flight, so the single writer sees the same sequence whatever the engine and worker count (and
its outputs are byte-identical) and memory stays flat in the number of records.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import pickle
import signal
import socket
import subprocess
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from itertools import chain, islice
from urllib.parse import urlsplit

from pipeline import PipelineError
from pipeline.ingest_record import Context, Judged, judge, judge_all
from pipeline.params import IngestSettings
from pipeline.sources.records import Item

log = logging.getLogger(__name__)

CHUNK = 64  # items per pool task: amortises the hand-off to a worker over many small images
IN_FLIGHT = 4  # chunks per worker submitted ahead of the writer
RAY_TASK_ITEMS = 1024  # items per Ray task (one row), at most: a task costs Ray and the driver some 15 ms of CPU
RAY_TASK_BYTES = 8 << 20  # pixel bytes a Ray task returns, at most: large images make smaller tasks
RAY_WINDOW = 32_768  # items per Ray dataset; two in flight (about 50 MB each here) are the Ray engine's memory bound
TCP_TIMEOUT = 3  # seconds for a TCP connection to $RAY_ADDRESS
RAY_CONNECT_TIMEOUT = 15  # seconds for Ray to connect there: the stage ends within 30 s when no cluster answers
PROBE = "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR'); ray.shutdown()"

Engine = Callable[[Iterable[Item]], Iterator[Judged]]


def chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk


def worker_count(settings: IngestSettings) -> int:
    return settings.workers or os.cpu_count() or 1


@contextmanager
def engine(settings: IngestSettings, context: Context, pixel_bytes: int) -> Iterator[Engine]:
    """The engine `ingest.engine` names, started here and stopped (workers terminated, a Ray started here shut
    down) when the block ends, an interrupt included. `pixel_bytes`: one accepted record's pixels."""
    workers = worker_count(settings)
    log.debug("ingest engine: %s", "Ray Data" if settings.engine == "ray" else
             "the stage's own process" if workers == 1 else f"a pool of {workers} processes")
    if settings.engine == "ray":
        with _ray(workers) as start:
            yield lambda items: _ray_judged(items, context, pixel_bytes, start)
    elif workers == 1:
        yield lambda items: (judge(item, context) for item in items)
    else:
        with _pool(workers, context) as pool:
            yield lambda items: _pool_judged(pool, items, workers)


# ---------------------------------------------------------------- local process pool

_context: Context | None = None  # a pool worker's Context, set once by its initializer


def _start_worker(context: Context) -> None:
    """The stage handles interrupts and terminates its workers: a worker ignores Ctrl-C (sent to the whole process
    group) and dies quietly on SIGTERM."""
    global _context
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _context = context


def _judge_chunk(items: list[Item]) -> list[Judged]:
    return judge_all(items, _context)


@contextmanager
def _pool(workers: int, context: Context):
    pool = multiprocessing.get_context().Pool(workers, initializer=_start_worker, initargs=(context,))
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _pool_judged(pool, items: Iterable[Item], workers: int) -> Iterator[Judged]:
    """Chunks submitted in order, at most IN_FLIGHT per worker ahead of the one the writer waits for (Pool.imap
    would read the whole source ahead)."""
    pending = deque()
    for chunk in chunks(items, CHUNK):
        pending.append(pool.apply_async(_judge_chunk, (chunk,)))
        if len(pending) >= IN_FLIGHT * workers:
            yield from pending.popleft().get()
    while pending:
        yield from pending.popleft().get()


# ---------------------------------------------------------------- Ray Data


def _reachable(address: str) -> None:
    """Ray's own connect retries for minutes against an address where no cluster answers, so first a TCP connection
    (refused or unroutable: at once), then Ray's connect in a child process that is killed after
    RAY_CONNECT_TIMEOUT (something else listening there). `auto` and `local` are Ray's to resolve."""
    if address not in ("auto", "local"):
        try:
            parts = urlsplit(f"//{address.removeprefix('ray://')}")
            if not parts.hostname or parts.port is None:
                raise ValueError("expected host:port or ray://host:port")
            socket.create_connection((parts.hostname, parts.port), timeout=TCP_TIMEOUT).close()
        except (OSError, ValueError) as exc:
            raise PipelineError(f"RAY_ADDRESS {address}: Ray cluster unreachable ({exc})") from None
    try:
        probe = subprocess.run([sys.executable, "-c", PROBE, address], capture_output=True, text=True,
                               timeout=RAY_CONNECT_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise PipelineError(f"RAY_ADDRESS {address}: Ray cluster unreachable (no Ray answered within "
                            f"{RAY_CONNECT_TIMEOUT} s)") from None
    if probe.returncode != 0:
        reason = (probe.stderr.strip().splitlines() or [f"exit status {probe.returncode}"])[-1]
        raise PipelineError(f"RAY_ADDRESS {address}: Ray cluster unreachable ({reason})")


@contextmanager
def _ray(workers: int) -> Iterator[Callable[[], int]]:
    """A function that starts a local Ray with `workers` CPUs, or connects to the cluster at $RAY_ADDRESS (its own
    CPUs; the pipeline package is shipped to its workers, so they run the driver's code); shut down, or
    disconnected from, when the block ends. An unreachable cluster is found here, before anything is read."""
    import ray

    import pipeline

    address = os.environ.get("RAY_ADDRESS")
    options = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.WARNING)
    if address:
        _reachable(address)

    def start() -> int:
        """Ray started, and its CPUs."""
        if address:
            ray.init(address=address, runtime_env={"py_modules": [pipeline]}, **options)
        else:
            ray.init(address="local", num_cpus=workers, **options)
        data = ray.data.DataContext.get_current()
        data.execution_options.preserve_order = True
        # with Ray Data's per-operator reservation, 2 CPUs ran one task at a time for about 70% of a window
        # (measured); the windows bound memory here, not Ray Data's budgets
        data.op_resource_reservation_enabled = False
        data.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)
        # the stage draws its own progress bar; Ray Data would warn, once a run, that its bars are off
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
        return max(int(ray.cluster_resources().get("CPU", 1)), 1)

    try:
        yield start
    finally:
        if ray.is_initialized():
            ray.shutdown()


def _judge_chunks(batch: dict, context: Context) -> dict:
    """A Ray task: each row a pickled chunk of items, judged into a pickled list."""
    import numpy as np

    return {"judged": np.array([pickle.dumps(judge_all(pickle.loads(chunk), context)) for chunk in batch["chunk"]],
                               dtype=object)}


def task_items(pixel_bytes: int, cpus: int) -> int:
    """Items per Ray task: as many as RAY_TASK_ITEMS and RAY_TASK_BYTES allow, and few enough that a window makes
    four tasks a CPU (a cluster's CPUs all busy, and the next window started while the last tasks run)."""
    return max(1, min(RAY_TASK_ITEMS, RAY_TASK_BYTES // max(pixel_bytes, 1), RAY_WINDOW // (4 * cpus)))


def _rows(window: list[Item], size: int) -> list[dict]:
    """A window as a dataset's rows: one pickled chunk of `size` items each (pickled once, as the pool sends them,
    the items share the source's settings), in an Arrow binary column (Ray would first try, and fail, to convert
    items to Arrow types)."""
    return [{"chunk": pickle.dumps(chunk)} for chunk in chunks(window, size)]


def _listed_first(windows: Iterator[list[Item]]) -> list[Item] | None:
    """The first window, and Ray Data imported: a driver thread's work while Ray starts."""
    window = next(windows, None)
    import ray.data  # noqa: F401

    return window


def _dataset(rows: list[dict], context: Context):
    """Rows as a Ray dataset of one block each, put into the object store now, run when read."""
    import ray

    return ray.data.from_items(rows, override_num_blocks=len(rows)).map_batches(
        _judge_chunks, fn_kwargs={"context": context}, batch_size=1, batch_format="numpy")


def _started(dataset) -> Iterator[dict]:
    """The dataset's batches in order (preserve_order), its run started: from the first batch on, Ray Data's own
    thread keeps its tasks going while the driver does other work."""
    batches = iter(dataset.iter_batches(batch_size=None, batch_format="numpy"))
    return chain(list(islice(batches, 1)), batches)


def _records(batches: Iterable[dict]) -> Iterator[Judged]:
    for batch in batches:
        for judged in batch["judged"]:
            yield from pickle.loads(judged)


def _ray_judged(items: Iterable[Item], context: Context, pixel_bytes: int,
                start: Callable[[], int]) -> Iterator[Judged]:
    """Windows of RAY_WINDOW items, one Ray dataset each. Ray starts (`start`: its own processes' work, mostly) while
    a driver thread lists the first window and imports Ray Data. Window k+1 is listed, pickled and put into the
    object store while window k runs, and started when k has one batch a CPU left to read, so the workers go from
    k's last tasks to k+1's without waiting for its start. (Two datasets running at once for longer, tried, cost
    the driver several times its CPU.)"""
    windows = chunks(items, RAY_WINDOW)
    with ThreadPoolExecutor(1) as lister:
        first = lister.submit(_listed_first, windows)
        cpus = start()
        window = first.result()
    size = task_items(pixel_bytes, cpus)
    running: Iterator[dict] = iter(())
    left = 0  # batches of the running dataset not read yet
    while window is not None:
        rows = _rows(window, size)
        dataset = _dataset(rows, context)
        yield from _records(islice(running, max(left - cpus, 0)))
        following = _started(dataset)  # its first batch read
        yield from _records(running)
        running, left = following, len(rows) - 1
        window = next(windows, None)
    yield from _records(running)
