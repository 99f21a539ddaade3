"""The artifact map: every path one stage hands another, declared once, with the stage that writes it.

Paths are relative to `Layout.root` (the repository, where DVC runs the stages; a test's copy of it). dvc.yaml
lists the same paths as each stage's outs and deps. A reader never opens a hand-off by hand: `read_json` returns
the typed model (pipeline.contracts) and every loader ends a missing file with the one message
"<path>: not found; run `dvc repro <the stage that writes it>`", and a file of the wrong shape with one line
naming the file and the field.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from pipeline import PipelineError
from pipeline.contracts import (
    BiasResult,
    EvalMetrics,
    ModelConfig,
    PretrainMetrics,
    Provenance,
    Release,
    RunRecord,
    ShiftResult,
    ValidationSummary,
)
from pipeline.params import first_error

# The folders and files of the hand-offs, by the stage that writes them (dvc.yaml's outs).
INGESTED = "data/ingested"  # ingest@<dataset>: <dataset>/{manifest.parquet, pixels/, quarantine.parquet, ...}
MANIFEST, QUARANTINE, PROVENANCE, PLANTED, PIXELS = (
    "manifest.parquet", "quarantine.parquet", "provenance.json", "planted.json", "pixels")
VALIDATION = "reports/validation"  # validate: summary.json, index.html, gx/
PREPARED = "data/prepared"  # prepare: <dataset>/<split>.{parquet,npy}, split_sizes.json
MODEL = "models/mae"  # pretrain: model.pt, config.json, run.json, reconstructions.png
CHECKPOINTS = "models/checkpoints"  # pretrain (persisted across runs)
PRETRAIN_METRICS = "metrics/pretrain.json"
PRETRAIN_LOSS = "metrics/pretrain_loss.csv"
EVAL = "data/eval"  # evaluate: samples.parquet, embeddings/<kind>.npy
EVAL_METRICS = "metrics/eval.json"
EVAL_FIGURES = "reports/eval"
BIAS = "reports/bias"  # audit_bias: bias.json, bias.md, <grouping>.png
SHIFT = "reports/shift"  # audit_shift: shift.json, shift.md, corruptions.parquet, corruption_curves.png, overtrust.png
SEAL = "complete.json"  # each stage's completion record, in its own folder (see `written_whole`)
GOVERNANCE = "reports/governance"  # report: release.json, report.md, report.html, model_card.md, ...

WRITERS = {INGESTED: "ingest", VALIDATION: "validate", PREPARED: "prepare", MODEL: "pretrain",
           CHECKPOINTS: "pretrain", PRETRAIN_METRICS: "pretrain", PRETRAIN_LOSS: "pretrain", EVAL: "evaluate",
           EVAL_METRICS: "evaluate", EVAL_FIGURES: "evaluate", BIAS: "audit_bias", SHIFT: "audit_shift",
           GOVERNANCE: "report"}

# The folders that carry a stage's completion record, and the outputs beside them that it covers.
SEALED_FOLDERS = (VALIDATION, PREPARED, MODEL, EVAL, BIAS, SHIFT, GOVERNANCE)  # and each INGESTED/<dataset>
SEALED_BESIDE = {PRETRAIN_METRICS: MODEL, PRETRAIN_LOSS: MODEL, EVAL_METRICS: EVAL, EVAL_FIGURES: EVAL}

# The splits prepare writes, and the ones of the training domains the model never saw.
SPLITS = ("train", "val", "test", "heldout")
UNSEEN = ("val", "test")

M = TypeVar("M", bound=BaseModel)


def writer(path: Path) -> str:
    """The DVC stage that writes `path` (`ingest@<dataset>` for an ingested dataset), or "" when none does."""
    parts = Path(path).parts
    for prefix, stage in WRITERS.items():
        steps = tuple(prefix.split("/"))
        for start in range(len(parts) - len(steps), -1, -1):
            if parts[start:start + len(steps)] == steps:
                rest = parts[start + len(steps):]
                return f"{stage}@{rest[0]}" if stage == "ingest" and rest else stage
    return ""


def not_found(path: Path) -> PipelineError:
    """The one message for a hand-off that is not there."""
    stage = writer(path)
    return PipelineError(f"{path}: not found; run `dvc repro{f' {stage}' if stage else ''}`")


def _siblings(final: Path) -> tuple[Path, Path]:
    return final.with_name(f".{final.name}.partial"), final.with_name(f".{final.name}.old")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _swap(partial: Path, final: Path, old: Path) -> None:
    if final.exists():
        final.rename(old)
    partial.rename(final)


# what a file system's refusal to write reads as; a write that fails with less than FULL_BYTES free is taken for a
# full disk whatever it raised (np.save says "N requested and M written", torch.save "unexpected pos")
REFUSED = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
           errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system"}
FULL_BYTES = 1 << 20
KILL_AT = "MAE_PIPELINE_KILL_AT"  # `failpoint`


def _free_bytes(path: Path) -> int:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def _size(count: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1024
    return ""


def disk_error(exc: BaseException, path: Path) -> PipelineError | None:
    """The one line for a write to `path` the file system refused (full, over quota, not allowed, read-only), or
    None when `exc` is something else."""
    code, stage = getattr(exc, "errno", None), writer(Path(path))
    again = f"run `dvc repro{f' {stage}' if stage else ''}`"
    if isinstance(exc, (OSError, RuntimeError)) and (code in (errno.ENOSPC, errno.EDQUOT)
                                                     or _free_bytes(path) < FULL_BYTES):
        return PipelineError(f"{path}: {REFUSED.get(code, REFUSED[errno.ENOSPC])} while writing it "
                             f"({_size(_free_bytes(path))} free when it failed; the previous output is kept); "
                             f"free some space and {again}")
    if code in REFUSED:
        return PipelineError(f"{getattr(exc, 'filename', None) or path}: {REFUSED[code]} ({again} once it is "
                             "writable)")
    return None


def allocated(path: Path, dtype, shape: tuple[int, ...]):
    """A new .npy of `shape`, its blocks reserved before it is mapped: a write through a map into a sparse file on
    a full disk is a SIGBUS that kills the stage before it can clean up or say why; a reservation that does not fit
    is an OSError (ENOSPC) that `disk_error` reads as one line."""
    import numpy as np

    mapped = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
    if hasattr(os, "posix_fallocate"):
        with Path(path).open("r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, Path(path).stat().st_size)
    return mapped


def failpoint(name: str) -> None:
    """Fault injection (tests/test_faults.py): with $MAE_PIPELINE_KILL_AT set to `name` the process is killed here
    by SIGKILL, which no handler or cleanup sees, as a lost machine or the out-of-memory killer would."""
    if os.environ.get(KILL_AT) == name:
        os.kill(os.getpid(), signal.SIGKILL)


def _digest(path: Path) -> str:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


@dataclass(frozen=True)
class Staged:
    """Where a stage writes each of its outputs while it runs: `staged(final_path)` is that path's place in the
    temporary siblings."""

    finals: tuple[Path, ...]
    partials: tuple[Path, ...]

    def __call__(self, path: Path) -> Path:
        path = Path(path)
        for final, partial in zip(self.finals, self.partials):
            if path == final or final in path.parents:
                return partial / path.relative_to(final)
        raise ValueError(f"{path} is not among this stage's outputs {[str(f) for f in self.finals]}")


@contextlib.contextmanager
def written_whole(folder: Path, *beside: Path, root: Path = Path(".")):
    """A stage's outputs written into temporary siblings and swapped in whole, with a completion record.

    `folder` is the stage's own folder, `beside` its other outputs (files or folders, such as metrics/eval.json),
    named relative to `root` in the record. Several paths cannot be renamed in one step, so `folder` goes last and
    carries SEAL: the size of every file in it and the sha256 of every file beside it. A stage stopped between
    the swaps leaves files beside that do not match the folder's record, and `sealed` refuses them: a later stage
    reads a complete, consistent set or nothing."""
    finals = (Path(folder), *map(Path, beside))
    siblings = [_siblings(final) for final in finals]
    # a folder is written in its partial sibling; a file (named with a suffix) inside its own, keeping its name
    partials = tuple(partial if index == 0 or not final.suffix else partial / final.name
                     for index, ((partial, _), final) in enumerate(zip(siblings, finals)))
    try:
        for pair in siblings:
            for stale in pair:
                _remove(stale)
        for (container, _), final, partial in zip(siblings, finals, partials):
            container.mkdir(parents=True)
            if not final.suffix:
                partial.mkdir(exist_ok=True)
        yield Staged(finals, partials)
        _seal(partials[0], {(final / p.relative_to(partial)).relative_to(root).as_posix(): _digest(p)
                            for final, partial in zip(finals[1:], partials[1:])
                            for p in sorted([partial] if partial.is_file() else partial.rglob("*")) if p.is_file()})
        stage = writer(finals[0])
        failpoint(f"{stage}:written")
        for partial, (container, old), final in reversed(list(zip(partials, siblings, finals))):  # sealed one last
            if final == finals[0] and len(finals) > 1:
                failpoint(f"{stage}:between-swaps")
            _swap(partial, final, old)
            if partial != container:
                _remove(container)
    except BaseException as exc:
        refused = disk_error(exc, finals[0]) if isinstance(exc, Exception) else None  # before the space is freed
        for partial, _ in siblings:
            _remove(partial)
        if refused:
            raise refused from None
        raise
    for _, old in siblings:
        _remove(old)


def _bytes(size: int | None) -> str:
    return "none" if size is None else f"{size} bytes"


def _seal(folder: Path, beside: dict[str, str]) -> None:
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*"))
             if p.is_file() and p.relative_to(folder).as_posix() != SEAL}
    (folder / SEAL).write_text(json.dumps({"beside": beside, "files": files}, indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def rewritten(folder: Path):
    """A sealed folder changed after its stage (a sign-off rewrites the report's sign-off block): copied into a
    temporary sibling, changed there, its completion record renewed and swapped in whole, like a stage's output."""
    folder = Path(folder)
    beside = json.loads((folder / SEAL).read_text())["beside"]
    partial, old = _siblings(folder)
    for stale in (partial, old):
        _remove(stale)
    shutil.copytree(folder, partial)
    try:
        yield partial
        _seal(partial, beside)
        _swap(partial, folder, old)
    except BaseException:
        _remove(partial)
        raise
    _remove(old)


def sealed(path: Path, folder: Path, root: Path = Path(".")) -> Path:
    """`path` after checking it against the completion record of `folder` (see `written_whole`), which wrote it."""
    path, folder = Path(path), Path(folder)
    try:
        record = json.loads((folder / SEAL).read_text())
    except FileNotFoundError:
        if not path.exists():
            raise not_found(path) from None
        raise PipelineError(f"{folder}: incomplete (no {SEAL}: its stage was stopped while writing, or an older "
                            f"pipeline wrote it); run `dvc repro {writer(folder)}`") from None
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{folder / SEAL}: unreadable ({exc}); run `dvc repro {writer(folder)}`") from None
    if path == folder or folder in path.parents:
        if not path.exists():
            raise not_found(path)
        inside = "" if path == folder else f"{path.relative_to(folder).as_posix()}/"
        recorded = {name: size for name, size in record["files"].items()
                    if name == inside.rstrip("/") or name.startswith(inside)}
        found = {file.relative_to(folder).as_posix(): file.stat().st_size
                 for file in ([path] if path.is_file() else sorted(path.rglob("*"))) if file.is_file()}
        found.pop(SEAL, None)
        for name in sorted(set(recorded) | set(found)):
            if recorded.get(name) != found.get(name):
                raise PipelineError(f"{folder / name}: not the file {folder / SEAL} records "
                                    f"({_bytes(recorded.get(name))} recorded, {_bytes(found.get(name))} found); "
                                    f"run `dvc repro {writer(folder)}`")
        return path
    key = path.relative_to(root).as_posix()
    if not path.exists():
        raise not_found(path)
    if record["beside"].get(key) != _digest(path):
        raise PipelineError(f"{path}: does not match {folder / SEAL} (written by another run of "
                            f"{writer(folder)} than the files in {folder}: a run stopped between its swaps?); "
                            f"run `dvc repro {writer(folder)}`")
    return path


def read_json(path: Path, model: type[M]) -> M:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise not_found(path) from None
    try:
        return model.model_validate_json(text)
    except ValidationError as exc:
        raise PipelineError(f"{path}: {first_error(exc)} (written by another version of the pipeline? run "
                            f"`dvc repro {writer(path)}`)") from None


def write_json(path: Path, document: BaseModel | dict) -> None:
    """A contract as indented JSON (NaN written as NaN, as read_json reads it back)."""
    data = document.model_dump(mode="json") if isinstance(document, BaseModel) else document
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def read_table(path: Path, columns: list[str] | None = None):
    import pandas as pd

    try:
        return pd.read_parquet(path, columns=columns)
    except FileNotFoundError:
        raise not_found(path) from None


def read_array(path: Path, mmap: bool = False):
    """An .npy / .npz hand-off; `mmap` maps an .npy read-only instead of reading it, so a split of any size costs
    no memory until its rows are read."""
    import numpy as np

    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except FileNotFoundError:
        raise not_found(path) from None


@dataclass(frozen=True)
class Layout:
    """Where each hand-off lives under `root`, and its typed loader."""

    root: Path = Path(".")

    def path(self, relative: str) -> Path:
        return self.root / relative

    def writing(self, folder: Path, *beside: str):
        """`written_whole` for a stage's folder and the outputs beside it (named as in the map above)."""
        return written_whole(folder, *(self.path(relative) for relative in beside), root=self.root)

    def sealed(self, path: Path) -> Path:
        """`path` checked against the completion record of the stage that wrote it (see `written_whole`)."""
        path = Path(path)
        relative = path.relative_to(self.root).as_posix()
        for prefix, folder in SEALED_BESIDE.items():
            if relative == prefix or relative.startswith(f"{prefix}/"):
                return sealed(path, self.path(folder), self.root)
        if relative.startswith(f"{INGESTED}/"):
            return sealed(path, self.ingested(relative.split("/")[2]), self.root)
        for folder in SEALED_FOLDERS:
            if relative == folder or relative.startswith(f"{folder}/"):
                return sealed(path, self.path(folder), self.root)
        raise ValueError(f"{path}: no stage's sealed output")

    # ingest@<dataset>
    def ingested(self, dataset: str | None = None) -> Path:
        return self.path(INGESTED) / dataset if dataset else self.path(INGESTED)

    def manifest(self, dataset: str) -> Path:
        return self.ingested(dataset) / MANIFEST

    def provenance_file(self, dataset: str) -> Path:
        return self.ingested(dataset) / PROVENANCE

    def provenance(self, dataset: str) -> Provenance:
        return read_json(self.sealed(self.provenance_file(dataset)), Provenance)

    # validate
    @property
    def validation(self) -> Path:
        return self.path(VALIDATION)

    @property
    def validation_file(self) -> Path:
        return self.validation / "summary.json"

    def validation_summary(self) -> ValidationSummary:
        return read_json(self.sealed(self.validation_file), ValidationSummary)

    # prepare
    def prepared(self, dataset: str | None = None) -> Path:
        return self.path(PREPARED) / dataset if dataset else self.path(PREPARED)

    def split_records(self, dataset: str, split: str) -> Path:
        return self.prepared(dataset) / f"{split}.parquet"

    def split_pixels(self, dataset: str, split: str) -> Path:
        return self.prepared(dataset) / f"{split}.npy"

    # pretrain
    @property
    def model(self) -> Path:
        return self.path(MODEL)

    @property
    def weights_file(self) -> Path:
        return self.model / "model.pt"

    @property
    def config_file(self) -> Path:
        return self.model / "config.json"

    @property
    def run_file(self) -> Path:
        return self.model / "run.json"

    @property
    def reconstructions_figure(self) -> Path:
        return self.model / "reconstructions.png"

    @property
    def checkpoint(self) -> Path:
        return self.path(CHECKPOINTS) / "pretrain.pt"

    @property
    def pretrain_metrics_file(self) -> Path:
        return self.path(PRETRAIN_METRICS)

    @property
    def loss_curve(self) -> Path:
        return self.path(PRETRAIN_LOSS)

    def config(self) -> ModelConfig:
        return read_json(self.sealed(self.config_file), ModelConfig)

    def run(self) -> RunRecord:
        return read_json(self.sealed(self.run_file), RunRecord)

    def pretrain_metrics(self) -> PretrainMetrics:
        return read_json(self.sealed(self.pretrain_metrics_file), PretrainMetrics)

    # evaluate
    @property
    def eval(self) -> Path:
        return self.path(EVAL)

    @property
    def samples_file(self) -> Path:
        return self.eval / "samples.parquet"

    @property
    def embeddings_folder(self) -> Path:
        return self.eval / "embeddings"

    def embeddings_file(self, kind: str) -> Path:
        return self.embeddings_folder / f"{kind}.npy"

    @property
    def eval_metrics_file(self) -> Path:
        return self.path(EVAL_METRICS)

    @property
    def eval_figures(self) -> Path:
        return self.path(EVAL_FIGURES)

    def samples(self):
        """The per-sample table: one row per record of every split (evaluate's hand-off to the audits)."""
        return read_table(self.sealed(self.samples_file))

    def embeddings(self, kind: str = "mae"):
        """Row i is the embedding of samples row i (its `embedding_row`)."""
        return read_array(self.sealed(self.embeddings_file(kind)))

    def eval_metrics(self) -> EvalMetrics:
        return read_json(self.sealed(self.eval_metrics_file), EvalMetrics)

    # the audits
    @property
    def bias(self) -> Path:
        return self.path(BIAS)

    @property
    def bias_file(self) -> Path:
        return self.bias / "bias.json"

    def bias_result(self) -> BiasResult:
        return read_json(self.sealed(self.bias_file), BiasResult)

    @property
    def shift(self) -> Path:
        return self.path(SHIFT)

    @property
    def shift_file(self) -> Path:
        return self.shift / "shift.json"

    def shift_result(self) -> ShiftResult:
        return read_json(self.sealed(self.shift_file), ShiftResult)

    # report
    @property
    def governance(self) -> Path:
        return self.path(GOVERNANCE)

    @property
    def release_file(self) -> Path:
        return self.governance / "release.json"

    def release(self) -> Release:
        return read_json(self.sealed(self.release_file), Release)
