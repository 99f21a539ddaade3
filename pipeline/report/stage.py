"""The report stage: reads what the earlier stages handed over (pipeline.artifacts), judges, decides the release,
and writes reports/governance/: report.md, report.html (the same Markdown rendered into one file that opens
offline), model_card.md, release.json, croissant/<dataset>.json, training_records.csv, params.yaml (the file it
was written with, which the next version's "changes since the approved version" reads) and figures/. Then registers
the encoder as a version of the MLflow registered model and logs the folder to the model's run. A blocked release
is a finding: the stage succeeds whatever the decision.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import yaml

from pipeline import PipelineError
from pipeline.artifacts import BIAS, EVAL_FIGURES, SHIFT, Layout, failpoint, read_table, write_json, written_whole
from pipeline.cards import DataCard, card_path, load_card
from pipeline.contracts import (
    BiasResult,
    EvalMetrics,
    ModelConfig,
    ModelFacts,
    PretrainMetrics,
    Provenance,
    Release,
    ReportPaths,
    Review,
    RunRecord,
    ShiftResult,
    ValidationSummary,
)
from pipeline.params import DEFAULT_PARAMS, Params, load_params
from pipeline.policy import load_withdrawals
from pipeline.registry import (
    PARAMS_ARTIFACT,
    approved_version,
    lineage_of_run,
    log_report,
    register_version,
    withdrawn_versions,
)
from pipeline.report.changes import changes
from pipeline.report.croissant import croissant
from pipeline.report.evidence import DatasetEvidence, Evidence
from pipeline.report.html import report_html
from pipeline.report.judge import decide_release, judge
from pipeline.report.markdown import report_markdown
from pipeline.report.model_card import model_card
from pipeline.review.store import context, logged_model_files, review_of, write_signoff
from pipeline.tracking import commits_between
from pipeline.validation.summary import failure_lines

log = logging.getLogger(__name__)

# area -> (folder, file pattern, caption prefix) of the figures the report embeds
FIGURES = {
    "eval": (EVAL_FIGURES, "*.png", "reconstructions (original / masked / reconstruction) of"),
    "bias": (BIAS, "*.png", "per-group values with intervals by"),
    "shift": (SHIFT, "corruption_curves.png", "degradation under corruption:"),
    "overtrust": (SHIFT, "overtrust.png", "reconstructions at several mask ratios, with their errors:"),
}


@dataclass(frozen=True)
class Gathered:
    """Everything the report reads, before any check is judged."""

    config: ModelConfig
    run: RunRecord
    cards: dict[str, DataCard]
    provenances: dict[str, Provenance]
    training: pd.DataFrame  # the train splits of every dataset the model trained on, one after another
    samples: pd.DataFrame
    validation: ValidationSummary
    pretrain: PretrainMetrics
    evaluation: EvalMetrics
    bias: BiasResult
    shift: ShiftResult

    @property
    def dataset(self) -> str:
        """The dataset evaluate and the audits judged."""
        return self.config.dataset

    @property
    def trained(self) -> list[str]:
        return [entry.name for entry in self.config.datasets]


def gather(params: Params, cards_dir: Path, layout: Layout) -> Gathered:
    config = layout.config()
    return Gathered(
        config=config, run=layout.run(),
        cards={name: load_card(card_path(name, cards_dir)) for name in params.datasets},
        provenances={name: layout.provenance(name) for name in params.datasets},
        training=pd.concat([read_table(layout.sealed(layout.split_records(entry.name, "train")))
                            for entry in config.datasets], ignore_index=True),
        samples=layout.samples(),
        validation=layout.validation_summary(), pretrain=layout.pretrain_metrics(), evaluation=layout.eval_metrics(),
        bias=layout.bias_result(), shift=layout.shift_result())


def collect_figures(layout: Layout, out: Path) -> dict[str, list[tuple[str, str]]]:
    """Copy every figure into figures/ so the folder is self-contained wherever it is logged; these, and only
    these, are the images report.html embeds."""
    (out / "figures").mkdir(parents=True, exist_ok=True)
    found: dict[str, list[tuple[str, str]]] = {}
    for area, (folder, pattern, caption) in FIGURES.items():
        found[area] = []
        for path in sorted(layout.path(folder).glob(pattern)):
            name = f"{area}-{path.name}"
            shutil.copyfile(path, out / "figures" / name)
            found[area].append((name, f"{caption} {path.stem.replace('-', ' ').replace('_', ' ')}"))
    if layout.reconstructions_figure.is_file():
        shutil.copyfile(layout.reconstructions_figure, out / "figures" / "pretrain-reconstructions.png")
        found["overtrust"].insert(0, ("pretrain-reconstructions.png", "validation reconstructions at the training "
                                                                      "mask ratio, with each image's error"))
    return found


def report(params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"), layout: Layout = Layout(),
           out: Path | None = None) -> Release:
    """Written in full into a folder beside `out` (reports/governance) and renamed into place only when all of it
    succeeded, the MLflow records included: a failed run leaves the previous report as it was."""
    final = out or layout.governance
    with written_whole(final, root=layout.root) as staged:
        return build(params_path, cards_dir, layout, staged(final), final)


def build(params_path: Path, cards_dir: Path, layout: Layout, out: Path, final: Path) -> Release:
    """The whole report written into `out`, which will be renamed to `final`."""
    params = load_params(params_path)
    settings = params.report
    gathered = gather(params, cards_dir, layout)
    dataset, run, config = gathered.dataset, gathered.run, gathered.config
    missing = [name for name in gathered.trained if name not in gathered.cards]
    if missing:
        raise PipelineError(f"{layout.config_file}: trained on {missing[0]}, which is not under datasets in "
                            f"{params_path}; a report needs the card and provenance of every dataset the model saw")
    withdrawn = load_withdrawals(layout.path(params.policy.withdrawals_file))
    approved = approved_version(settings.registered_model)  # before log_report may move the alias
    counts = {name: gathered.provenances[name].counts for name in gathered.trained}
    checks, memorization = judge(params, dataset, gathered.cards, counts, gathered.validation, gathered.training,
                                 gathered.samples, gathered.bias, gathered.shift, withdrawn, approved, run.run_id)
    decision = decide_release(checks, settings)
    lineage = lineage_of_run(run, [layout.split_records(name, "train") for name in gathered.trained], layout.root)
    training = gathered.training[["record_id", "sha256", "source_sha256", "dataset"]]
    training.to_csv(out / "training_records.csv", index=False)
    shutil.copyfile(params_path, out / Path(PARAMS_ARTIFACT).name)  # what the next version's delta reads
    delta = None if approved is None or approved.run_id == run.run_id else changes(
        approved, training, yaml.safe_load(params_path.read_text()) or {}, checks, withdrawn, lineage["git.commit"],
        commits_between(approved.release.model.git_commit, lineage["git.commit"])
        if approved.release is not None else None)
    files = logged_model_files(run.model_uri) if run.model_uri else {}
    version = register_version(settings.registered_model, run, decision.decision, files)
    failpoint("report:registered")  # registered, nothing else recorded yet: what `reconcile` heals
    others = withdrawn_versions(settings.registered_model, withdrawn, params.policy.withdrawals_file, version)
    model = ModelFacts(dataset=dataset, trained_on=config.datasets, run_id=run.run_id, experiment_id=run.experiment_id,
                       model_uri=run.model_uri or "—", registered_model=settings.registered_model, version=version,
                       git_commit=lineage["git.commit"], git_dirty=lineage["git.dirty"],
                       git_changed_paths=lineage["git.changed_paths"], preset=config.preset,
                       mask_ratio=config.mask_ratio, pool=config.pool, architecture=config.model, files=files)
    evidence = Evidence(
        model=model, release=decision,
        datasets={n: DatasetEvidence(gathered.cards[n], gathered.provenances[n].counts) for n in gathered.cards},
        policy=params.policy, withdrawals=len(withdrawn),
        training_records={name: int((training["dataset"] == name).sum()) for name in gathered.trained},
        validation=gathered.validation,
        validation_failures=failure_lines(gathered.validation, "critical")
        + failure_lines(gathered.validation, "warning"),
        pretrain=gathered.pretrain, evaluation=gathered.evaluation, bias=gathered.bias, shift=gathered.shift,
        memorization=memorization, approved=None if approved is None else
        f"version {approved.version} (run {approved.run_id})", data_hashes=lineage["hashes"],
        figures=collect_figures(layout, out),
        review=Review(required=settings.require_signoff, required_signoffs=settings.required_signoffs,
                      state="awaiting sign-off" if settings.require_signoff else "not required", signoffs=[],
                      problems=[]),
        changes=delta, withdrawn_versions=others)
    markdown = report_markdown(evidence)
    (out / "report.md").write_text(markdown)
    figures = [name for found in evidence.figures.values() for name, _ in found]
    (out / "report.html").write_text(report_html(markdown, out, f"Governance report: {' + '.join(gathered.trained)}",
                                                 settings.figure_width, figures))
    (out / "model_card.md").write_text(model_card(evidence))
    (out / "croissant").mkdir()
    for name in gathered.cards:
        document = croissant(gathered.cards[name], gathered.provenances[name].counts, layout.manifest(name),
                             final / "croissant")
        (out / "croissant" / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    release = Release(decision=decision.decision, blocked_by=decision.blocked_by, areas=decision.areas,
                      policy=decision.policy, model=model, data_hashes=lineage["hashes"],
                      report=ReportPaths(html=str(final / "report.html"), markdown=str(final / "report.md"),
                                         model_card=str(final / "model_card.md")),
                      checks=decision.checks, review=evidence.review, changes=delta,
                      withdrawn_versions=others)
    write_json(out / "release.json", release)
    if settings.require_signoff:
        release = signed_off(release, out, params, params_path, cards_dir, layout)
    log_report(settings.registered_model, version, run, out, release)
    return release


def signed_off(release: Release, out: Path, params: Params, params_path: Path, cards_dir: Path,
               layout: Layout) -> Release:
    """The report with the sign-offs already recorded for its version (a report re-run): each still holds only
    if what it signed is unchanged, which their digests, blind to the sign-off block, tell."""
    ctx = context(release, out, params, params_path, cards_dir, layout, reviewers_missing_ok=True,
                  model_files=release.model.files)  # read at registration, moments ago: not downloaded again
    review = review_of(ctx, params, datetime.now(UTC).date())
    write_signoff(out, review)
    return release.model_copy(update={"review": review})
