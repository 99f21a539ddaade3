"""A run's results as Markdown, so that every number README.md quotes is one a run wrote, not one typed.

Reads only what the stages wrote in a run folder (metrics/pretrain.json, metrics/eval.json,
reports/governance/release.json, through their typed loaders) and renders the headline numbers: pretraining
against its baseline, reconstruction / probe / kNN per split against the baselines, and every release check with
its value, interval and threshold, as `release.json` states them. `python -m pipeline results --readme README.md
--block default` replaces README's block between `<!-- results:default -->` and `<!-- /results:default -->`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline import PipelineError
from pipeline.artifacts import Layout
from pipeline.contracts import Check, EvalMetrics, PretrainMetrics, Release
from pipeline.render import code, fmt, table


@dataclass(frozen=True)
class Run:
    pretrain: PretrainMetrics
    evaluation: EvalMetrics
    release: Release


def read_run(root: Path) -> Run:
    """The run's result files; a missing one names the stage to run."""
    layout = Layout(root)
    return Run(layout.pretrain_metrics(), layout.eval_metrics(), layout.release())


def results_markdown(run: Run, command: str) -> str:
    pretrain, evaluation, release = run.pretrain, run.evaluation, run.release
    lines = [f"Produced by `{command}`; model run `{release.model.run_id}`, git commit "
             f"`{release.model.git_commit[:12]}`.", "",
             f"Pretraining: {pretrain.epochs} epochs, {pretrain.steps} steps; held-out masked-patch loss "
             f"{fmt(pretrain.val_masked_loss)} against {fmt(pretrain.val_patch_mean_baseline)} for predicting "
             f"each patch's own mean ({pretrain.improvement_over_baseline:.1%} lower).", ""]
    rows = []
    for split, entry in evaluation.reconstruction.items():
        row = [split, entry.count, fmt(entry.mse), fmt(entry.mse_random_init), fmt(entry.mse_patch_mean)]
        for method in (evaluation.probe, evaluation.knn):
            scores = method.splits().get(split) if method.available else None
            row += [" / ".join(fmt(scores.get(k), 3) for k in ("mae", "random_init", "raw_pixels"))
                    if scores else "—"]
        rows.append(row)
    lines += table(["split", "images", "hidden-pixel MSE", "random init", "patch mean",
                    "probe top-1 (MAE / random init / raw pixels)",
                    f"kNN top-1, k = {fmt(evaluation.knn.k)} (MAE / random init / raw pixels)"], rows)
    lines += [f"Release decision: **{release.decision}**"
              + (f", blocked by {', '.join(code(c) for c in release.blocked_by)}." if release.blocked_by else "."), ""]
    lines += table(["check", "status", "blocking", "value", "interval", "threshold", "P(pass), no gap",
                    "P(fail), 2x tolerance"],
                   [[code(c.id), c.status, "advisory" if c.blocking is False else "yes", fmt(c.value),
                     fmt(c.interval), fmt(c.threshold), *_operating(c)] for c in release.checks])
    lines += ["P(pass), no gap and P(fail), 2x tolerance: what each check's decision does at this run's sizes if the "
              "true gap were none, or twice the tolerance in the harmful direction (the report gives the method, "
              "the probabilities at the tolerance, and the sizes an 80% pass or fail would need).", ""]
    return "\n".join(lines).rstrip() + "\n"


def _operating(check: Check) -> list[str]:
    points = {p.label: p for p in check.operating.points} if check.operating else {}
    return [fmt(points["no gap"].p_pass, 3) if "no gap" in points else "—",
            fmt(points["twice the tolerance"].p_fail, 3) if "twice the tolerance" in points else "—"]


def replace_block(document: str, block: str, content: str, path: Path) -> str:
    """`document` with the text between the block's two markers replaced by `content`."""
    start, end = f"<!-- results:{block} -->", f"<!-- /results:{block} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(document):
        raise PipelineError(f"{path}: no block {start} ... {end} to replace")
    return pattern.sub(lambda _: f"{start}\n{content}{end}", document, count=1)
