"""A run's results as Markdown, so that every number README.md quotes is one a run wrote, not one typed.

Reads only what the stages wrote in a run folder (metrics/pretrain.json, metrics/eval.json,
reports/governance/release.json) and renders the headline numbers: pretraining against its baseline,
reconstruction / probe / kNN per split against the baselines, and every release check with its value,
interval and threshold, as `release.json` states them. `python -m pipeline results --readme README.md
--block default` replaces README's block between `<!-- results:default -->` and `<!-- /results:default -->`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from pipeline import PipelineError
from pipeline.audit import fmt

SOURCES = {"pretrain": Path("metrics/pretrain.json"), "evaluation": Path("metrics/eval.json"),
           "release": Path("reports/governance/release.json")}


def read_run(root: Path) -> dict:
    """The run's result files by name; a missing one names the stage to run."""
    found = {}
    for name, relative in SOURCES.items():
        path = root / relative
        try:
            found[name] = json.loads(path.read_text())
        except FileNotFoundError:
            raise PipelineError(f"{path}: not found; run `dvc repro` in {root} first") from None
        except ValueError as exc:
            raise PipelineError(f"{path}: not valid JSON ({exc})") from None
    return found


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def _table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows] + [""]


def results_markdown(run: dict, command: str) -> str:
    pretrain, evaluation, release = run["pretrain"], run["evaluation"], run["release"]
    lines = [f"Produced by `{command}`; model run `{release['model']['run_id']}`, git commit "
             f"`{release['model']['git_commit'][:12]}`.", "",
             f"Pretraining: {pretrain['epochs']} epochs, {pretrain['steps']} steps; held-out masked-patch loss "
             f"{fmt(pretrain['val_masked_loss'])} against {fmt(pretrain['val_patch_mean_baseline'])} for predicting "
             f"each patch's own mean ({pretrain['improvement_over_baseline']:.1%} lower).", ""]
    rows = []
    for split, entry in evaluation["reconstruction"].items():
        row = [split, entry["count"], fmt(entry["mse"]), fmt(entry["mse_random_init"]), fmt(entry["mse_patch_mean"])]
        for method in ("probe", "knn"):
            scores = evaluation[method].get(split) if evaluation[method].get("available") else None
            row += [" / ".join(fmt(scores[k], 3) for k in ("mae", "random_init", "raw_pixels")) if scores else "—"]
        rows.append(row)
    lines += _table(["split", "images", "hidden-pixel MSE", "random init", "patch mean",
                     "probe top-1 (MAE / random init / raw pixels)",
                     f"kNN top-1, k = {evaluation['knn'].get('k', '—')} (MAE / random init / raw pixels)"], rows)
    lines += [f"Release decision: **{release['decision']}**"
              + (f", blocked by {', '.join(f'`{c}`' for c in release['blocked_by'])}." if release["blocked_by"]
                 else "."), ""]
    lines += _table(["check", "status", "blocking", "value", "interval", "threshold"],
                    [[f"`{c['id']}`", c["status"], "yes" if c.get("blocking", True) else "advisory", fmt(c["value"]),
                      fmt(c.get("interval")), fmt(c.get("threshold"))] for c in release["checks"]])
    return "\n".join(lines).rstrip() + "\n"


def replace_block(document: str, block: str, content: str, path: Path) -> str:
    """`document` with the text between the block's two markers replaced by `content`."""
    start, end = f"<!-- results:{block} -->", f"<!-- /results:{block} -->"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    if not pattern.search(document):
        raise PipelineError(f"{path}: no block {start} ... {end} to replace")
    return pattern.sub(lambda _: f"{start}\n{content}{end}", document, count=1)
