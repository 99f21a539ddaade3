"""The artifact map: every path one stage hands another, declared once, with the stage that writes it.

Paths are relative to `Layout.root` (the repository, where DVC runs the stages; a test's copy of it). dvc.yaml
lists the same paths as each stage's outs and deps. A reader never opens a hand-off by hand: `read_json` returns
the typed model (pipeline.contracts) and every loader ends a missing file with the one message
"<path>: not found; run `dvc repro <the stage that writes it>`", and a file of the wrong shape with one line
naming the file and the field.
"""

from __future__ import annotations

import contextlib
import json
import shutil
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
GOVERNANCE = "reports/governance"  # report: release.json, report.md, report.html, model_card.md, ...

WRITERS = {INGESTED: "ingest", VALIDATION: "validate", PREPARED: "prepare", MODEL: "pretrain",
           CHECKPOINTS: "pretrain", PRETRAIN_METRICS: "pretrain", PRETRAIN_LOSS: "pretrain", EVAL: "evaluate",
           EVAL_METRICS: "evaluate", EVAL_FIGURES: "evaluate", BIAS: "audit_bias", SHIFT: "audit_shift",
           GOVERNANCE: "report"}

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


@contextlib.contextmanager
def swapped_in(final: Path):
    """A temporary sibling of `final` to write a stage's output into, put in its place whole when the block
    succeeds and removed when it fails, so `final` is only ever the old output or the new one: a later stage never
    reads a half-written folder. A kill mid-swap leaves at most a stale `.partial`/`.old` sibling, cleared here next
    time (and `final` missing, which `dvc repro` restores)."""
    final = Path(final)
    partial, old = (final.with_name(f".{final.name}.{suffix}") for suffix in ("partial", "old"))
    for stale in (partial, old):
        shutil.rmtree(stale, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        yield partial
        if final.exists():
            final.rename(old)
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


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

    # ingest@<dataset>
    def ingested(self, dataset: str | None = None) -> Path:
        return self.path(INGESTED) / dataset if dataset else self.path(INGESTED)

    def manifest(self, dataset: str) -> Path:
        return self.ingested(dataset) / MANIFEST

    def provenance_file(self, dataset: str) -> Path:
        return self.ingested(dataset) / PROVENANCE

    def provenance(self, dataset: str) -> Provenance:
        return read_json(self.provenance_file(dataset), Provenance)

    # validate
    @property
    def validation(self) -> Path:
        return self.path(VALIDATION)

    @property
    def validation_file(self) -> Path:
        return self.validation / "summary.json"

    def validation_summary(self) -> ValidationSummary:
        return read_json(self.validation_file, ValidationSummary)

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
        return read_json(self.config_file, ModelConfig)

    def run(self) -> RunRecord:
        return read_json(self.run_file, RunRecord)

    def pretrain_metrics(self) -> PretrainMetrics:
        return read_json(self.pretrain_metrics_file, PretrainMetrics)

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
        return read_table(self.samples_file)

    def embeddings(self, kind: str = "mae"):
        """Row i is the embedding of samples row i (its `embedding_row`)."""
        return read_array(self.embeddings_file(kind))

    def eval_metrics(self) -> EvalMetrics:
        return read_json(self.eval_metrics_file, EvalMetrics)

    # the audits
    @property
    def bias(self) -> Path:
        return self.path(BIAS)

    @property
    def bias_file(self) -> Path:
        return self.bias / "bias.json"

    def bias_result(self) -> BiasResult:
        return read_json(self.bias_file, BiasResult)

    @property
    def shift(self) -> Path:
        return self.path(SHIFT)

    @property
    def shift_file(self) -> Path:
        return self.shift / "shift.json"

    def shift_result(self) -> ShiftResult:
        return read_json(self.shift_file, ShiftResult)

    # report
    @property
    def governance(self) -> Path:
        return self.path(GOVERNANCE)

    @property
    def release_file(self) -> Path:
        return self.governance / "release.json"

    def release(self) -> Release:
        return read_json(self.release_file, Release)
