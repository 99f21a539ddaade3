"""The report stage: every governance question answered with evidence, one release decision, beside the model.

Reads what the earlier stages wrote (provenance, validation summary, model, evaluation, audits) and writes
reports/governance/: report.md, report.html (the same Markdown rendered into one file that opens offline),
model_card.md, release.json, croissant/<dataset>.json and figures/. Then registers the encoder as a
version of the MLflow registered model and logs the folder and the training record ids to the model's run.
A blocked release is a finding: the stage succeeds whatever the decision.
"""

from __future__ import annotations

import base64
import fnmatch
import html
import json
import logging
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from pipeline import PipelineError
from pipeline.audit import fmt, jsonable, overall_status, text
from pipeline.audit.stats import Criterion, compare
from pipeline.cards import DataCard, card_path, load_card
from pipeline.evaluate import UNSEEN
from pipeline.ingest import load_withdrawals
from pipeline.params import DEFAULT_PARAMS, Params, ReportSettings, load_params
from pipeline.policy import REASONS, RecordFacts, decide
from pipeline.registry import lineage_of_run, log_report, register_version
from pipeline.sources.records import sha256_bytes
from pipeline.validate import failure_lines

log = logging.getLogger(__name__)

AREAS = ("validation", "consent", "bias", "shift", "memorization")


@dataclass(frozen=True)
class Inputs:
    """Where the stage reads from: the repository layout, or a test's copy of it."""

    root: Path = Path(".")
    cards_dir: Path = Path("data_cards")

    def path(self, relative: str) -> Path:
        return self.root / relative

    def json(self, relative: str) -> dict:
        path = self.path(relative)
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise PipelineError(f"{path}: not found; run `dvc repro` up to the stage that writes it") from None
        except ValueError as exc:
            raise PipelineError(f"{path}: not valid JSON ({exc})") from None


# ---------------------------------------------------------------- checks (pure)

def check(check_id: str, area: str, status: str, statistic: str, value, threshold, detail: str,
          interval=None, **extra) -> dict:
    return {"id": check_id, "area": area, "status": status, "statistic": statistic, "value": value,
            "interval": interval, "threshold": threshold, "detail": detail, **extra}


def validation_check(summary: dict) -> dict:
    return check("validation.critical", "validation", "pass" if summary["passed"] else "fail",
                 "failed critical expectations", summary["failed_critical"], 0, "reports/validation/index.html",
                 warnings=summary["failed_warning"])


def consent_checks(dataset: str, card: DataCard, params: Params, provenance: dict, training: pd.DataFrame,
                   withdrawn: frozenset[str]) -> list[dict]:
    """For the dataset that trained the model: every record accounted for, every training record still
    allowed under today's policy and withdrawals file, and whether consent is documented at all."""
    counts = provenance["counts"]
    accounted = counts["read"] == counts["accepted"] + counts["quarantined"]
    refused: dict[str, int] = {}
    for row in training.itertuples(index=False):
        facts = RecordFacts(row.record_id, row.sha256, row.source_sha256, row.license, row.consent_status)
        verdict = decide(facts, card, params.policy, withdrawn)
        if not verdict.accepted:
            refused[verdict.reason] = refused.get(verdict.reason, 0) + 1
    undocumented = card.consent.basis == "undocumented"
    detail = f"reports/governance/report.md#consent; data/ingested/{dataset}/quarantine.parquet"
    return [
        check(f"consent.accounted.{dataset}", "consent", "pass" if accounted else "fail",
              "read - accepted - quarantined", counts["read"] - counts["accepted"] - counts["quarantined"], 0, detail),
        check(f"consent.training_records.{dataset}", "consent", "fail" if refused else "pass",
              "training records the policy refuses today", sum(refused.values()), 0, detail,
              reasons=dict(sorted(refused.items())), training_records=len(training)),
        check(f"consent.documented.{dataset}", "consent", "inconclusive" if undocumented else "pass",
              "consent basis", card.consent.basis, "documented", detail),
    ]


def memorization_checks(samples: pd.DataFrame, attributes: list[str], settings: ReportSettings,
                        min_group_size: int) -> tuple[list[dict], dict]:
    """Unseen images' reconstruction error relative to training images', overall and per group: a model
    that reconstructs what it saw much better than what it did not has memorised it (a privacy signal).
    One-sided: only an unseen error above the training error beyond the threshold is harmful."""
    criterion = Criterion(settings.max_memorization_gap, "higher", equivalence=False)
    parts = [("overall", samples)] + [(f"{attr}={value}", part) for attr in attributes
                                      for value, part in samples.groupby(attr)]
    checks, table = [], {}
    for position, (name, part) in enumerate(parts):
        seen = part.loc[part["split"] == "train", "recon_mse"].to_numpy()
        unseen = part.loc[part["split"].isin(UNSEEN), "recon_mse"].to_numpy()
        entry = {"train_count": len(seen), "unseen_count": len(unseen)}
        if min(len(seen), len(unseen)) < min_group_size:
            note = f"insufficient data (fewer than {min_group_size} images on a side)"
            gap = {"status": "inconclusive", "value": None, "interval": None, "reason": note}
            entry["note"] = note
        else:
            gap = compare(seen, unseen, "relative", criterion, settings, seed=[settings.seed, position])
            entry.update(train_mse=float(seen.mean()), unseen_mse=float(unseen.mean()))
        entry.update(status=gap["status"], value=gap["value"], interval=gap["interval"])
        table[name] = entry
        checks.append(check(f"memorization.{name}", "memorization", statistic="unseen error / training error - 1",
                            threshold=settings.max_memorization_gap, detail="reports/governance/report.md#memorization",
                            reference="training images", **gap))
    return checks, table


# what release.json keeps of an audit's checks: the decision and the statistics a reviewer needs to trust it
AUDIT_FIELDS = ("id", "status", "statistic", "value", "interval", "threshold", "detail", "grouping", "group",
                "metric", "reference", "test", "harmful", "confidence", "adjustment", "mc_error", "n_boot",
                "p_value", "permutations", "alpha", "power", "min_detectable", "reason")


def audit_checks(area: str, result: dict) -> list[dict]:
    return [{"area": area, **{k: c[k] for k in AUDIT_FIELDS if k in c}} for c in result["checks"]]


def decide_release(checks: list[dict], settings: ReportSettings) -> dict:
    """Approved only when no blocking check has a blocking status; advisory checks are shown, not counted."""
    for item in checks:
        item["blocking"] = not any(fnmatch.fnmatchcase(item["id"], pattern) for pattern in settings.advisory)
    blockers = [c["id"] for c in checks if c["blocking"] and c["status"] in settings.block_on]
    areas = {}
    for area in AREAS:
        blocking = [c["status"] for c in checks if c["area"] == area and c["blocking"]]
        advisory = [c["status"] for c in checks if c["area"] == area and not c["blocking"]]
        areas[area] = {"status": overall_status(blocking), "advisory": overall_status(advisory) if advisory else None}
    return {"decision": "blocked" if blockers else "approved", "blocked_by": blockers, "areas": areas,
            "policy": {"block_on": list(settings.block_on), "advisory": list(settings.advisory)}}


# ---------------------------------------------------------------- Markdown

def code(value) -> str:
    """An identifier as a code span; a value that could close the span or split a table cell (a backtick or a
    pipe) is shown as escaped text instead."""
    value = " ".join(str(value).split())
    return text(value) if "`" in value or "|" in value else f"`{value}`"


def table(header: list[str], rows: list[list]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return lines + [""]


def checks_table(checks: list[dict]) -> list[str]:
    return table(["check", "status", "blocking", "statistic", "value", "interval", "threshold", "detail"],
                 [[text(c["id"]), c["status"].upper() if c["status"] == "fail" else c["status"],
                   "yes" if c.get("blocking", True) else "advisory", text(c["statistic"]), fmt(c["value"]),
                   fmt(c["interval"]), text(c["threshold"]), code(c["detail"])] for c in checks])


def _confidence(c: dict) -> str:
    adjustment = c.get("adjustment") or {}
    if not c.get("confidence"):
        return "—"
    if adjustment.get("comparisons", 1) > 1:
        return (f"{c['confidence']:.2%} ({adjustment['method']}, {adjustment['comparisons']} comparisons, family "
                f"{adjustment['family_confidence']:.0%})")
    return f"{c['confidence']:.0%}"


def _power(c: dict) -> str:
    """What the check could have found: the smallest effect it resolves with 80% power, and for a drift test that
    found nothing, the power at each simulated mixture share."""
    if c.get("power"):
        share = c["power"].get("detectable_share")
        curve = ", ".join(f"{p['share']:.0%}: {p['power']:.2f}" for p in c["power"]["curve"])
        found = f"a {share:.0%} share of held-out-domain images" if share is not None else "no simulated share"
        return f"{found} (power by share: {curve})"
    if c.get("min_detectable"):
        return f"a difference of {fmt(c['min_detectable']['value'], 3)}"
    return "—"


def evidence_table(checks: list[dict]) -> list[str]:
    """How each decided check was decided: against what, by which test, at which (adjusted) confidence, how far the
    bounds could move with another bootstrap seed, the p-value of a test, and what the check could have found."""
    rows = [[text(c["id"]), text(c.get("reference") or "—"),
             c.get("test") or ("MMD permutation" if c.get("p_value") is not None else "—"),
             f"{c['harmful']} is worse" if c.get("harmful") else "—", _confidence(c),
             fmt(c.get("n_boot") or c.get("permutations")), fmt(c.get("mc_error"), 4),
             (f"{c['p_value']:.4f}" + (f" (alpha {c['alpha']})" if c.get("alpha") else "")) if c.get("p_value")
             is not None else "—", _power(c), text(c.get("reason") or "")]
            for c in checks if any(c.get(k) is not None for k in ("reference", "p_value", "min_detectable"))]
    if not rows:
        return []
    return ["How each check was decided (MC error: the Monte-Carlo error of each bound or p-value, so a decision "
            "does not hang on the resampling seed; a bound within it of the threshold is inconclusive):", ""] + table(
        ["check", "reference", "test", "direction", "confidence", "resamples", "MC error", "p-value",
         "what it could detect (80% power)", "reason"], rows)


def figure(name: str, caption: str) -> list[str]:
    return [f"![{text(caption)}](figures/{name})", "", f"*{text(caption)}*", ""]


def report_markdown(evidence: dict) -> str:
    """The whole report; report.html is this text rendered."""
    release, model = evidence["release"], evidence["model"]
    checks = release["checks"]
    lines = [f"# Governance report: MAE encoder on {text(model['dataset'])}", ""]
    verdict = release["decision"].upper()
    if release["blocked_by"]:
        lines += [f"## Release decision: {verdict}", "", "Blocked by these checks (status in "
                  f"{', '.join(release['policy']['block_on'])}):", ""]
        lines += [f"- {code(c)}" for c in release["blocked_by"]] + [""]
    else:
        lines += [f"## Release decision: {verdict}", "", "No blocking check has a blocking status "
                  f"({', '.join(release['policy']['block_on'])}).", ""]
    inconclusive = [c["id"] for c in checks if c["status"] == "inconclusive"]
    if inconclusive:
        lines += ["Inconclusive (the data could not decide either way; more evidence is needed, not assumed): "
                  + ", ".join(code(c) for c in inconclusive), ""]
    lines += table(["area", "status of blocking checks", "status of advisory checks"],
                   [[area, e["status"], e["advisory"] or "—"] for area, e in release["areas"].items()])
    lines += [f"Model: registered model `{model['registered_model']}` version {model['version']}, MLflow run "
              f"`{model['run_id']}`, git commit `{model['git_commit']}`" + (
                  f" (uncommitted changes: {text(model['git_changed_paths'] or 'paths not recorded')})"
                  if model["git_dirty"] == "true" else "")
              + ".", "", "Every number below is a measurement on this model and this data. Disparities are signed "
              "differences against a named reference (a group, in-distribution images, training images), with "
              "bootstrap intervals at the confidence shown, adjusted (Bonferroni) where several groups are compared. "
              "A group check passes only when its whole interval lies within plus or minus the threshold "
              "(equivalence), fails only when it lies wholly beyond the threshold on the harmful side, and is "
              "inconclusive otherwise; domain and memorization checks are one-sided (non-inferiority). A bound "
              "within its Monte-Carlo error of the threshold is inconclusive rather than decided on resampling "
              "noise.", "", "## Release checks", ""]
    lines += checks_table(checks) + evidence_table(checks)
    lines += provenance_section(evidence) + consent_section(evidence) + validation_section(evidence)
    lines += training_section(evidence) + evaluation_section(evidence) + audit_section(evidence, "bias")
    lines += audit_section(evidence, "shift") + memorization_section(evidence) + overtrust_section(evidence)
    lines += uses_section(evidence)
    return "\n".join(lines).rstrip() + "\n"


def provenance_section(evidence: dict) -> list[str]:
    lines = ["## Provenance", ""]
    rows = []
    for name, item in evidence["datasets"].items():
        card, counts = item["card"], item["counts"]
        rows.append([text(name), text(card["version"]), text(card["source"].get("uri") or card["source"]["kind"]),
                     text(card["license"]["spdx"]), text("; ".join(card["provenance"]["creators"])),
                     f"{card['provenance']['timeframe']['start']} to {card['provenance']['timeframe']['end']}",
                     counts["read"], counts["accepted"], counts["quarantined"]])
    lines += table(["dataset", "card version", "source", "licence", "creators", "timeframe", "read", "accepted",
                    "quarantined"], rows)
    lines += ["Collection method per dataset:", ""]
    lines += [f"- **{text(name)}**: {text(item['card']['provenance']['collection_method'])}"
              for name, item in evidence["datasets"].items()] + [""]
    rows = [[text(name), reason, text(REASONS.get(reason, "")), n] for name, item in evidence["datasets"].items()
            for reason, n in sorted(item["counts"]["by_reason"].items())]
    lines += ["Quarantined records by reason (each is kept in `data/ingested/<dataset>/quarantine.parquet`):", ""]
    lines += table(["dataset", "reason", "meaning", "records"], rows) if rows else ["None quarantined.", ""]
    return lines


def consent_section(evidence: dict) -> list[str]:
    lines = ['<a id="consent"></a>', "", "## Consent", ""]
    rows = []
    for name, item in evidence["datasets"].items():
        consent, by_reason = item["card"]["consent"], item["counts"]["by_reason"]
        rows.append([text(name), consent["basis"], consent["training_permission"],
                     by_reason.get("consent_withdrawn", 0), by_reason.get("withdrawal_request", 0),
                     sum(n for r, n in by_reason.items() if r.startswith("consent") or r == "training_not_permitted"),
                     text(consent["withdrawal"])])
    lines += table(["dataset", "basis", "training permission", "withdrawn by subjects", "excluded on request "
                    "(withdrawals file)", "excluded for consent in all", "how to withdraw"], rows)
    undocumented = [n for n, item in evidence["datasets"].items() if item["card"]["consent"]["basis"] == "undocumented"]
    accepted = evidence["policy"]["accept_undocumented_consent"]
    if undocumented:
        lines += [f"Subjects' consent is undocumented for: {', '.join(map(text, undocumented))}. The policy "
                  + ("accepts such datasets (policy.accept_undocumented_consent); a reviewer should weigh that."
                     if accepted else "refuses such datasets: their records are quarantined."), ""]
    else:
        lines += ["Every dataset documents its subjects' consent.", ""]
    lines += [f"Withdrawals file `{evidence['policy']['withdrawals_file']}`: {evidence['withdrawals']} entries. "
              f"The model was trained on {evidence['training']['records']} records of {evidence['model']['dataset']}; "
              "their ids are logged with the model (`governance/training_records.csv`) so that "
              "`python -m pipeline consent-check` finds every model version a later withdrawal touches.", ""]
    return lines


def validation_section(evidence: dict) -> list[str]:
    summary = evidence["validation"]
    lines = ["## Data validation", "", f"Great Expectations validation {'passed' if summary['passed'] else 'FAILED'}: "
             f"{summary['failed_critical']} critical and {summary['failed_warning']} warning expectations failed. "
             "Data Docs: `reports/validation/index.html`.", ""]
    lines += table(["dataset", "expectations", "failed", "critical", "warning"],
                   [[text(n), d["evaluated"], d["failed"], d["failed_critical"], d["failed_warning"]]
                    for n, d in summary["datasets"].items()])
    if evidence["validation_failures"]:
        lines += ["Failed expectations:", ""] + [f"- {text(line)}" for line in evidence["validation_failures"]] + [""]
    return lines


def training_section(evidence: dict) -> list[str]:
    model, metrics = evidence["model"], evidence["pretrain"]
    arch = model["architecture"]
    lines = ["## Training", ""]
    lines += table(["what", "value"], [
        ["architecture", f"MAE ViT preset `{model['preset']}`: {arch['img_size']} px images, patch {arch['patch_size']}, "
                         f"encoder {arch['depth']} x {arch['embed_dim']}, decoder {arch['decoder_depth']} x "
                         f"{arch['decoder_embed_dim']}, mask ratio {model['mask_ratio']}"],
        ["trained on", f"{text(model['dataset'])}: {evidence['training']['records']} training images"],
        ["epochs / steps", f"{metrics['epochs']} / {metrics['steps']}"],
        ["validation masked-patch loss", f"{metrics['val_masked_loss']:.4f} against {metrics['val_patch_mean_baseline']:.4f} "
                                         "for predicting each patch's mean"],
        ["MLflow run", f"`{model['run_id']}` (experiment {model['experiment_id']})"],
        ["logged encoder", f"`{model['model_uri']}`"],
        ["registered", f"`{model['registered_model']}` version {model['version']}"],
        ["git commit", f"`{model['git_commit']}`, uncommitted changes: {model['git_dirty']}"],
    ])
    lines += ["Data versions (DVC md5 of each training input, as tagged on the run):", ""]
    lines += table(["input", "md5"], [[f"`{k}`", f"`{v}`"] for k, v in evidence["data_hashes"].items()])
    return lines


def evaluation_section(evidence: dict) -> list[str]:
    metrics = evidence["evaluation"]
    lines = ["## Evaluation", "", f"Hidden-pixel reconstruction error (MSE in [0, 1]) at mask ratio "
             f"{metrics['mask_ratio']}, on masks fixed by a seed, against a randomly initialised model of the same "
             "architecture and a predictor of each patch's mean:", ""]
    lines += table(["split", "images", "MSE", "PSNR (dB)", "random init MSE", "patch mean MSE"],
                   [[s, r["count"], fmt(r["mse"]), fmt(r["psnr"], 2), fmt(r["mse_random_init"]),
                     fmt(r["mse_patch_mean"])] for s, r in metrics["reconstruction"].items()])
    for name, title in (("probe", "Linear probe"), ("knn", "kNN")):
        entry = metrics.get(name, {})
        if not entry.get("available"):
            lines += [f"{title}: not run ({text(entry.get('reason', 'no labels'))}).", ""]
            continue
        splits = [s for s in entry if isinstance(entry[s], dict)]
        lines += [f"{title} top-1 accuracy on frozen features (margin over random init "
                  f"{fmt(entry['margin_over_random_init'], 3)}, over raw pixels {fmt(entry['margin_over_raw_pixels'], 3)}"
                  " on test):", ""]
        lines += table(["split", "MAE", "random init", "raw pixels"],
                       [[s, fmt(entry[s]["mae"], 3), fmt(entry[s]["random_init"], 3), fmt(entry[s]["raw_pixels"], 3)]
                        for s in splits])
    for name, caption in evidence["figures"]["eval"]:
        lines += figure(name, caption)
    return lines


def audit_section(evidence: dict, area: str) -> list[str]:
    result = evidence[area]
    title = {"bias": "Bias", "shift": "Domain shift"}[area]
    lines = [f"## {title}", "", f"Audit status: **{result['status']}**. Full report: `reports/{area}/{area}.md`.", ""]
    lines += checks_table([c for c in evidence["release"]["checks"] if c["area"] == area])
    if area == "bias":
        rows = [[text(attr), text(group), item["train_count"], f"{item['train_share']:.1%}",
                 fmt(item["population_share"], 3), fmt(item["ratio"], 3)]
                for attr, entry in result["representation"].items() for group, item in entry["groups"].items()]
        lines += ["Representation in the training data against the card's population shares:", ""]
        lines += table(["attribute", "group", "training images", "training share", "population share", "ratio"], rows)
    else:
        corruptions = result.get("corruptions") or {}
        check = next((c for c in evidence["release"]["checks"] if c["id"] == "shift.corruptions"), None)
        if check is not None:
            probe = corruptions.get("relative_mce_probe")
            lines += [f"Corruptions ({corruptions.get('images', '—')} images, six corruptions at five severities): mean "
                      f"reconstruction error {fmt(check['value'], 3)} times the clean error, against at most "
                      f"{fmt(check['threshold'])}: **{check['status']}**"
                      + (f"; mean probe error {fmt(probe, 3)} times the clean error" if probe is not None else "")
                      + ".", ""]
    for name, caption in evidence["figures"][area]:
        lines += figure(name, caption)
    return lines


def memorization_section(evidence: dict) -> list[str]:
    lines = ['<a id="memorization"></a>', "", "## Memorization", "",
             "Reconstruction error on training images against images the model never saw (val and test). An unseen "
             "error well above the training error means the model reproduces what it was shown: a privacy risk for "
             "the people in the training data.", ""]
    lines += table(["images", "training n", "unseen n", "training MSE", "unseen MSE", "relative gap", "interval",
                    "status"],
                   [[text(name), e["train_count"], e["unseen_count"], fmt(e.get("train_mse")), fmt(e.get("unseen_mse")),
                     fmt(e["value"]), fmt(e["interval"]), e["status"] if "note" not in e else e["note"]]
                    for name, e in evidence["memorization"].items()])
    return lines


def overtrust_section(evidence: dict) -> list[str]:
    lines = ["## Overtrust", "", "A reconstruction looks convincing whether or not it is right: the model fills "
             "hidden patches with plausible texture, not with what was there. Read the error printed with each image, "
             "not the picture; at high mask ratios the reconstruction is a guess. Do not use reconstructions as "
             "evidence of what an image contained.", ""]
    for name, caption in evidence["figures"]["overtrust"]:
        lines += figure(name, caption)
    return lines


def uses_section(evidence: dict) -> list[str]:
    lines = ["## Intended and out-of-scope uses", ""]
    for name, item in evidence["datasets"].items():
        card = item["card"]
        lines += [f"### {text(name)}", "", "Intended:", ""] + [f"- {text(u)}" for u in card["uses"]["intended"]]
        lines += ["", "Out of scope:", ""] + [f"- {text(u)}" for u in card["uses"]["out_of_scope"]]
        lines += ["", "Known limitations:", ""] + [f"- {text(u)}" for u in card["known_limitations"]]
        lines += ["", "Known biases:", ""] + [f"- {text(u)}" for u in card["known_biases"]] + [""]
    return lines


# ---------------------------------------------------------------- HTML

STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222;line-height:1.45}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .5em;
text-align:left;vertical-align:top}th{background:#f3f3f3}code{background:#f5f5f5;padding:0 .2em;word-break:break-all}
img{max-width:100%;border:1px solid #ddd}h1{border-bottom:2px solid #333}h2{border-bottom:1px solid #ccc;margin-top:2em}"""


def report_html(markdown: str, folder: Path, title: str, figure_width: int, figures: Iterable[str] = ()) -> str:
    """The Markdown rendered with raw HTML disabled (so any markup that slipped through stays text), no script and
    no remote resource: one file that opens offline. Only the stage's own figures are embedded, as data URIs: an
    image whose source is `figures/<name>` for one of `figures` (the names in folder/figures). Any other image,
    a path or a URL, is shown as inert text, never read or fetched."""
    from markdown_it import MarkdownIt

    parser = MarkdownIt("commonmark", {"html": False}).enable("table")
    embedded = {f"figures/{name}": base64.b64encode((folder / "figures" / name).read_bytes()).decode("ascii")
                for name in figures}

    def image(renderer, tokens, idx, options, env):
        token = tokens[idx]
        alt = parser.renderer.renderInlineAsText(token.children or [], options, env)
        data = embedded.get(token.attrGet("src"))
        if data is None:
            return html.escape(f"![{alt}]({token.attrGet('src')})")
        return (f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" '
                f'style="max-width:{figure_width}px">')

    parser.add_render_rule("image", image)
    # the two anchors are the only raw HTML the report writes itself; everything else is escaped
    body = parser.render(re.sub(r'^<a id="([a-z]+)"></a>$', r"{{anchor:\1}}", markdown, flags=re.M))
    body = re.sub(r"<p>\{\{anchor:([a-z]+)\}\}</p>", r'<a id="\1"></a>', body)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f'<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; img-src data:; '
            f'style-src \'unsafe-inline\'">\n<style>{STYLE}</style>\n</head>\n<body>\n{body}</body>\n</html>\n')


# ---------------------------------------------------------------- model card and Croissant

def model_card(evidence: dict) -> str:
    """Mitchell et al.'s sections under Hugging Face model-card front matter."""
    from huggingface_hub import ModelCard, ModelCardData

    model, release = evidence["model"], evidence["release"]
    trained = evidence["datasets"][model["dataset"]]["card"]
    data = ModelCardData(license=trained["license"]["spdx"].lower(), library_name="pytorch",
                         pipeline_tag="image-feature-extraction", datasets=[model["dataset"]],
                         tags=["masked-autoencoder", "vit", "governance-audited", f"release-{release['decision']}"],
                         model_name=model["registered_model"])
    checks = release["checks"]
    by_area = {area: [c for c in checks if c["area"] == area] for area in AREAS}
    bias_groups = evidence["bias"]["groupings"]
    lines = [f"# {model['registered_model']} (version {model['version']})", "",
             f"**Release decision: {release['decision'].upper()}.** The governance report "
             "(`report.html`, `report.md`) and `release.json` are logged beside this model.", "",
             "## Model details", "",
             f"A Masked Autoencoder (He et al., 2021) ViT encoder, preset `{model['preset']}`, pretrained on "
             f"{text(model['dataset'])} by hiding {model['mask_ratio']:.0%} of each image's patches and reconstructing "
             "them. "
             f"MLflow run `{model['run_id']}`, git commit `{model['git_commit']}`, logged model `{model['model_uri']}`.",
             "", "## Intended use", ""]
    lines += [f"- {text(u)}" for u in trained["uses"]["intended"]]
    lines += ["", "Out of scope:", ""] + [f"- {text(u)}" for u in trained["uses"]["out_of_scope"]]
    lines += ["- Treating a reconstruction as evidence of what a hidden region contained.", "",
              "## Factors", "", "Groups audited (sensitive attributes from the data card, and their intersections): "
              + (", ".join(map(text, bias_groups)) or "none declared") + ". Domains held out for the shift audit: "
              + (", ".join(map(text, evidence["shift"].get("held_out_domains", []))) or "none") + ".", "",
              "## Metrics", "", "Hidden-pixel reconstruction MSE and PSNR against a random-init model and a patch-mean "
              "predictor; linear-probe and kNN top-1 accuracy on frozen features against random-init and raw-pixel "
              "features; per-group gaps with bootstrap intervals (fairlearn MetricFrame); held-out domain error "
              "increase, corruption error, MMD drift test; train against unseen error for memorization.", "",
              "## Evaluation data", "",
              f"The val, test and held-out-domain splits of {text(model['dataset'])}, never used for training.", "",
              "## Training data", "",
              f"{evidence['training']['records']} training records of {text(model['dataset'])} (licence "
              f"{text(trained['license']['spdx'])}, consent basis {trained['consent']['basis']}); record ids in "
              "`governance/training_records.csv` on the MLflow run.", "", "## Quantitative analyses", ""]
    for area in ("bias", "shift", "memorization"):
        lines += [f"### {area}", ""] + checks_table(by_area[area]) + evidence_table(by_area[area])
    lines += ["Intersectional groups are included in the bias checks above (ids with `x`).", "",
              "## Ethical considerations", ""]
    lines += [f"- {text(b)}" for b in trained["known_biases"]]
    lines += [f"- Personal information: {text(trained['personal_information']['description'])}",
              "- Reconstructions look convincing even where they are wrong (see the overtrust section of the report).",
              "", "## Caveats and recommendations", ""]
    lines += [f"- {text(x)}" for x in trained["known_limitations"]]
    inconclusive = [c["id"] for c in checks if c["status"] == "inconclusive"]
    if inconclusive:
        lines.append(f"- Inconclusive checks need more evaluation data: {', '.join(map(code, inconclusive))}.")
    return str(ModelCard.from_template(data, template_str="---\n{{ card_data }}\n---\n\n{{ body }}\n",
                                       body="\n".join(lines)))


def croissant(card: DataCard, provenance: dict, manifest: Path, folder: Path) -> dict:
    """The card as Croissant 1.0 JSON-LD with its Responsible-AI fields, describing the accepted records; the
    manifest's contentUrl is relative to `folder`, where the JSON-LD is written."""
    import datetime as dt

    import mlcroissant as mlc

    try:
        digest = sha256_bytes(manifest.read_bytes())
    except FileNotFoundError:
        raise PipelineError(f"{manifest}: not found; run `dvc repro ingest@{card.name}`") from None
    columns = ["record_id", "sha256", "license", "consent_status", "consent_basis", "domain"]
    columns += [a.name for a in card.sensitive_attributes] + (["label"] if card.labels else [])
    file_id = "manifest.parquet"
    fields = [mlc.Field(id=f"records/{c}", name=c, data_types=[mlc.DataType.TEXT],
                        source=mlc.Source(file_object=file_id, extract=mlc.Extract(column=c))) for c in columns]
    timeframe = card.provenance.timeframe
    license_url = card.license.url or f"https://spdx.org/licenses/{card.license.spdx}.html"
    metadata = mlc.Metadata(
        name=card.name, description=card.description, version=card.version, url=card.source.uri,
        license=[license_url], creators=[mlc.Person(name=c) for c in card.provenance.creators],
        cite_as=f"{card.name} v{card.version}, {', '.join(card.provenance.creators)}",
        date_published=dt.datetime.combine(timeframe.end, dt.time()),
        distribution=[mlc.FileObject(id=file_id, name=file_id, content_url=os.path.relpath(manifest, folder),
                                     encoding_formats=["application/x-parquet"], sha256=digest)],
        record_sets=[mlc.RecordSet(id="records", name="records", fields=fields)],
        data_collection=card.provenance.collection_method,
        data_collection_timeframe=[dt.datetime.combine(timeframe.start, dt.time()),
                                   dt.datetime.combine(timeframe.end, dt.time())],
        data_collection_missing_data=f"{provenance['counts']['quarantined']} of {provenance['counts']['read']} records "
                                     "quarantined by the consent and licence policy: "
                                     + ", ".join(f"{r} {n}" for r, n in sorted(provenance["counts"]["by_reason"].items())),
        data_biases=card.known_biases, data_limitations=card.known_limitations,
        data_use_cases=card.uses.intended + [f"Out of scope: {u}" for u in card.uses.out_of_scope],
        personal_sensitive_information=[card.personal_information.description]
        + [f"{a.name}: {a.description}" for a in card.sensitive_attributes],
        data_social_impact=f"Consent basis {card.consent.basis}; training permission "
                           f"{card.consent.training_permission}. Withdrawal: {card.consent.withdrawal}",
        data_release_maintenance_plan=", ".join(m.name for m in card.maintainers),
    )
    return json.loads(json.dumps(metadata.to_json(), default=str))


# ---------------------------------------------------------------- the stage

FIGURES = {
    "eval": ("reports/eval", "*.png", "reconstructions (original / masked / reconstruction) of"),
    "bias": ("reports/bias", "*.png", "per-group values with intervals by"),
    "shift": ("reports/shift", "corruption_curves.png", "degradation under corruption:"),
    "overtrust": ("reports/shift", "overtrust.png", "reconstructions at several mask ratios, with their errors:"),
}


def collect_figures(inputs: Inputs, out: Path) -> dict[str, list[tuple[str, str]]]:
    """Copy every figure into figures/ so the folder is self-contained wherever it is logged."""
    (out / "figures").mkdir(parents=True, exist_ok=True)
    found: dict[str, list[tuple[str, str]]] = {}
    for area, (folder, pattern, caption) in FIGURES.items():
        found[area] = []
        for path in sorted(inputs.path(folder).glob(pattern)):
            name = f"{area}-{path.name}"
            shutil.copyfile(path, out / "figures" / name)
            found[area].append((name, f"{caption} {path.stem.replace('-', ' ').replace('_', ' ')}"))
    pretrain = inputs.path("models/mae/reconstructions.png")
    if pretrain.is_file():
        shutil.copyfile(pretrain, out / "figures" / "pretrain-reconstructions.png")
        found["overtrust"].insert(0, ("pretrain-reconstructions.png", "validation reconstructions at the training "
                                                                      "mask ratio, with each image's error"))
    return found


def gather(params: Params, inputs: Inputs) -> dict:
    """Everything the report states, as plain data, before any check is judged."""
    config = inputs.json("models/mae/config.json")
    run = inputs.json("models/mae/run.json")
    dataset = config["dataset"]
    datasets = {}
    for name in params.datasets:
        card = load_card(card_path(name, inputs.cards_dir))
        provenance = inputs.json(f"data/ingested/{name}/provenance.json")
        datasets[name] = {"card": card, "provenance": provenance}
    train_path = inputs.path(f"data/prepared/{dataset}/train.parquet")
    try:
        training = pd.read_parquet(train_path)
        samples = pd.read_parquet(inputs.path("data/eval/samples.parquet"))
    except FileNotFoundError as exc:
        raise PipelineError(f"{exc.filename}: not found; run `dvc repro evaluate` first") from None
    return {"config": config, "run": run, "dataset": dataset, "datasets": datasets, "training_frame": training,
            "train_path": train_path, "samples": samples,
            "validation": inputs.json("reports/validation/summary.json"),
            "pretrain": inputs.json("metrics/pretrain.json"), "evaluation": inputs.json("metrics/eval.json"),
            "bias": inputs.json("reports/bias/bias.json"), "shift": inputs.json("reports/shift/shift.json")}


def judge(params: Params, gathered: dict, withdrawn: frozenset[str]) -> tuple[list[dict], dict]:
    dataset = gathered["dataset"]
    item = gathered["datasets"][dataset]
    card: DataCard = item["card"]
    memorization, table_ = memorization_checks(gathered["samples"], [a.name for a in card.sensitive_attributes],
                                               params.report, params.audit_bias.min_group_size)
    checks = [validation_check(gathered["validation"])]
    checks += consent_checks(dataset, card, params, item["provenance"], gathered["training_frame"], withdrawn)
    checks += audit_checks("bias", gathered["bias"]) + audit_checks("shift", gathered["shift"]) + memorization
    return checks, table_


def report(params_path: Path = DEFAULT_PARAMS, inputs: Inputs = Inputs(), out: Path | None = None) -> dict:
    """Written in full into a folder beside `out` (reports/governance) and renamed into place only when all of it
    succeeded, the MLflow records included: a failed run leaves the previous report as it was."""
    final = out or inputs.path("reports/governance")
    partial = final.with_name(f".{final.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        result = build(params_path, inputs, partial, final)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return result


def build(params_path: Path, inputs: Inputs, out: Path, final: Path) -> dict:
    """The whole report written into `out`, which will be renamed to `final`."""
    params = load_params(params_path)
    settings = params.report
    gathered = gather(params, inputs)
    withdrawn = load_withdrawals(inputs.path(params.policy.withdrawals_file))
    checks, memorization = judge(params, gathered, withdrawn)
    release = {**decide_release(checks, settings), "checks": checks}
    run, config = gathered["run"], gathered["config"]
    lineage = lineage_of_run(run, gathered["train_path"], inputs.root)
    training = gathered["training_frame"][["record_id", "sha256", "source_sha256"]]
    training.to_csv(out / "training_records.csv", index=False)
    version = register_version(settings.registered_model, run, release["decision"])
    model = {"dataset": gathered["dataset"], "run_id": run["run_id"], "experiment_id": run.get("experiment_id"),
             "model_uri": run.get("model_uri", "—"), "registered_model": settings.registered_model,
             "version": version, "git_commit": lineage["git.commit"], "git_dirty": lineage["git.dirty"],
             "git_changed_paths": lineage["git.changed_paths"],
             "preset": config["preset"], "mask_ratio": config["mask_ratio"], "architecture": config["model"]}
    evidence = {
        "model": model, "release": release, "confidence": settings.confidence,
        "datasets": {n: {"card": d["card"].model_dump(mode="json"), "counts": d["provenance"]["counts"]}
                     for n, d in gathered["datasets"].items()},
        "policy": params.policy.model_dump(mode="json"), "withdrawals": len(withdrawn),
        "training": {"records": len(training)}, "validation": gathered["validation"],
        "validation_failures": failure_lines(gathered["validation"], "critical")
        + failure_lines(gathered["validation"], "warning"),
        "pretrain": gathered["pretrain"], "evaluation": gathered["evaluation"], "bias": gathered["bias"],
        "shift": gathered["shift"], "memorization": memorization, "data_hashes": lineage["hashes"],
        "figures": collect_figures(inputs, out),
    }
    markdown = report_markdown(evidence)
    (out / "report.md").write_text(markdown)
    figures = [name for found in evidence["figures"].values() for name, _ in found]
    (out / "report.html").write_text(report_html(markdown, out, f"Governance report: {gathered['dataset']}",
                                                 settings.figure_width, figures))
    (out / "model_card.md").write_text(model_card(evidence))
    (out / "croissant").mkdir()
    for name, item in gathered["datasets"].items():
        document = croissant(item["card"], item["provenance"], inputs.path(f"data/ingested/{name}/manifest.parquet"),
                             final / "croissant")
        (out / "croissant" / f"{name}.json").write_text(json.dumps(document, indent=2) + "\n")
    result = {"decision": release["decision"], "blocked_by": release["blocked_by"], "areas": release["areas"],
              "policy": release["policy"], "model": model, "data_hashes": lineage["hashes"],
              "report": {"html": str(final / "report.html"), "markdown": str(final / "report.md"),
                         "model_card": str(final / "model_card.md")},
              "checks": checks}
    (out / "release.json").write_text(json.dumps(result, indent=2, default=jsonable) + "\n")
    log_report(settings.registered_model, version, run, out, result)
    return result
