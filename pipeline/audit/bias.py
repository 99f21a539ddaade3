"""The bias audit: does the model serve every group of people, and every intersection of groups, alike?

For each sensitive attribute of the card, and each intersection of two or more of them, fairlearn's
MetricFrame computes per-group reconstruction error and probe / kNN accuracy on images the model never
saw (audit_bias.splits), with bootstrap intervals. Each group is then compared with a reference group (the
one audit_bias.reference_groups names, else the best-served) by a signed statistic: error / the reference's
- 1 and accuracy - the reference's, bootstrapped with each group resampled on its own (pipeline.audit.stats).
A check passes when its interval lies within ±tolerance (an equivalence test), fails when it lies wholly
beyond the tolerance in the harmful direction, and is inconclusive otherwise; with more than one comparison
per metric and grouping the confidence is adjusted (audit_bias.adjustment). Groups smaller than
audit_bias.min_group_size are reported as "insufficient data" with their count only, never with values that
could single people out, along with the group size that would detect the threshold gap.
Representation: each group's share of the training data against the card's target population share.
"""

from __future__ import annotations

import itertools
import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import PipelineError
from pipeline.audit import drawn, fmt, overall_status, text, write_report
from pipeline.audit.stats import Criterion, adjusted_confidence, compare
from pipeline.cards import DataCard, card_path, load_card
from pipeline.params import DEFAULT_PARAMS, BiasSettings, load_params
from pipeline.paths import BIAS_REPORT, EVAL, MODEL_DIR

log = logging.getLogger(__name__)

# metric name -> (per-sample column, whether larger values are worse)
METRICS = {
    "reconstruction_error": ("recon_mse", True),
    "probe_accuracy": ("probe_correct", False),
    "knn_accuracy": ("knn_correct", False),
}


def groupings(attributes: list[str]) -> list[tuple[str, ...]]:
    """Each attribute alone, then every intersection of two or more."""
    return [combo for size in range(1, len(attributes) + 1) for combo in itertools.combinations(attributes, size)]


def group_labels(samples: pd.DataFrame, grouping: tuple[str, ...]) -> pd.Series:
    return samples[list(grouping)].astype(str).agg(" & ".join, axis=1).rename(" x ".join(grouping))


def required_group_size(std: float, effect: float, confidence: float, power: float) -> int | None:
    """Per-group sample size for a two-sided test at `confidence` to detect a difference `effect` in means
    with the given power (normal approximation, equal groups)."""
    from scipy.stats import norm

    if not effect > 0 or not np.isfinite(std):
        return None
    z = norm.ppf(1 - (1 - confidence) / 2) + norm.ppf(power)
    return int(np.ceil(2 * (std * z / effect) ** 2))


def _metric(values: np.ndarray):
    """A MetricFrame metric over row positions (y_true), so one bootstrap serves every metric."""
    return lambda rows, _unused: float(np.nanmean(values[np.asarray(rows, dtype=int)]))


def reference_group(by_group: pd.Series, grouping: tuple[str, ...], lower_is_better: bool,
                    named: dict[str, str]) -> tuple[str | None, str]:
    """The group every other is compared with, and why: the one params name for each attribute of the
    grouping, else the best-served group by its point value (`by_group`: the groups large enough to measure)."""
    if all(attr in named for attr in grouping):
        return " & ".join(named[attr] for attr in grouping), "named in audit_bias.reference_groups"
    if by_group.empty:
        return None, "no group is large enough to serve as the reference"
    return str(by_group.idxmin() if lower_is_better else by_group.idxmax()), "best-served group"


def audit_grouping(samples: pd.DataFrame, grouping: tuple[str, ...], metrics: list[str],
                   settings: BiasSettings) -> tuple[dict, list[dict]]:
    """Per-group values with intervals for one grouping, and per metric one check for each group but the
    reference."""
    from fairlearn.metrics import MetricFrame

    name = " x ".join(grouping)
    labels = group_labels(samples, grouping)
    counts = labels.value_counts().sort_index()
    enough = counts[counts >= settings.min_group_size].index
    kept = samples[labels.isin(enough).to_numpy()].reset_index(drop=True)
    kept_labels = labels[labels.isin(enough)].reset_index(drop=True)
    alpha = 1 - settings.confidence
    report: dict = {"grouping": list(grouping), "counts": {str(k): int(v) for k, v in counts.items()},
                    "insufficient_data": [str(g) for g in counts.index if g not in enough], "metrics": {}}
    checks: list[dict] = []
    frame = None
    if len(enough):
        frame = MetricFrame(
            metrics={metric: _metric(kept[METRICS[metric][0]].to_numpy(dtype=np.float64)) for metric in metrics},
            y_true=np.arange(len(kept)), y_pred=np.zeros(len(kept)), sensitive_features=kept_labels,
            n_boot=settings.n_boot, ci_quantiles=[alpha / 2, 1 - alpha / 2], random_state=settings.seed)
    for metric in metrics:
        entry, metric_checks = _metric_result(frame, metric, grouping, kept, kept_labels, counts, enough, settings)
        report["metrics"][metric] = entry
        checks += metric_checks
    return report, checks


def _metric_result(frame, metric, grouping, kept, kept_labels, counts, enough, settings):
    name = " x ".join(grouping)
    column, lower_is_better = METRICS[metric]
    threshold = settings.max_relative_error_gap if lower_is_better else settings.max_accuracy_gap
    criterion = Criterion(threshold, "higher" if lower_is_better else "lower", equivalence=True)
    kind, statistic = (("relative", "group error / reference error - 1") if lower_is_better
                       else ("difference", "group accuracy - reference accuracy"))
    detail = f"reports/bias/bias.md#{_anchor(name)}"
    values = kept[column].to_numpy(dtype=np.float64)
    spread = float(np.nanstd(values)) if len(values) else float("nan")
    groups: dict[str, dict] = {str(g): {"count": int(c), "status": "insufficient data"}
                               for g, c in counts.items() if g not in enough}
    entry: dict = {"statistic": statistic, "threshold": threshold, "test": criterion.test,
                   "harmful": criterion.harmful, "groups": groups, "overall": None}
    if len(counts) < 2:
        check = {"id": f"bias.{metric}.{name}", "grouping": name, "metric": metric, "status": "inconclusive",
                 "statistic": statistic, "value": None, "interval": None, "threshold": threshold, "detail": detail,
                 "reason": "fewer than two groups among the evaluated images: nothing to compare"}
        return entry, [check]
    by_group = pd.Series(dtype=float)
    if frame is not None:
        by_group = frame.by_group[metric]
        low, high = frame.by_group_ci[0][metric], frame.by_group_ci[1][metric]
        entry.update(overall=float(frame.overall[metric]),
                     overall_interval=[float(v[metric]) for v in frame.overall_ci])
        for group, value in by_group.items():
            groups[str(group)] = {"count": int(counts[group]), "status": "ok", "value": float(value),
                                  "interval": [float(low[group]), float(high[group])]}
    reference, why = reference_group(by_group, grouping, lower_is_better, settings.reference_groups)
    compared = [g for g in enough if g != reference] if reference in enough else []
    entry.update(reference=reference, reference_reason=why, comparisons=len(compared),
                 reference_value=float(by_group[reference]) if reference in enough else None)
    effect = threshold * entry["reference_value"] if lower_is_better and entry["reference_value"] else threshold
    confidence = adjusted_confidence(settings.confidence, len(compared), settings.adjustment)
    entry["required_group_size"] = required_group_size(spread, effect, confidence, settings.power)
    checks = []
    for position, group in enumerate(counts.index):
        if group == reference:
            continue
        check = {"id": f"bias.{metric}.{name}={group}", "grouping": name, "group": str(group), "metric": metric,
                 "statistic": statistic, "reference": reference, "threshold": threshold, "detail": detail}
        if group not in enough:
            needed = entry["required_group_size"]
            check.update(status="inconclusive", value=None, interval=None,
                         reason=f"insufficient data: {int(counts[group])} samples, fewer than "
                                f"{settings.min_group_size}; about {needed if needed else '—'} per group would "
                                "detect a gap at the tolerance")
        elif reference not in enough:
            check.update(status="inconclusive", value=None, interval=None,
                         reason=f"the reference group {reference} has fewer than {settings.min_group_size} samples")
        else:
            comparison = compare(values[(kept_labels == reference).to_numpy()],
                                 values[(kept_labels == group).to_numpy()], kind, criterion, settings,
                                 seed=[settings.seed, position], comparisons=len(compared),
                                 adjustment=settings.adjustment)
            check.update(comparison)
            groups[str(group)].update(vs_reference=comparison["value"], vs_reference_interval=comparison["interval"],
                                      decision=comparison["status"])
        checks.append(check)
    return entry, checks


def representation(train: pd.DataFrame, card: DataCard, min_ratio: float) -> tuple[dict, list[dict]]:
    """Each group's share of the training images against the card's target population share."""
    report, checks = {}, []
    for attr in card.sensitive_attributes:
        shares = train[attr.name].value_counts(normalize=True)
        target = attr.population_shares
        entry = {value: {"train_count": int((train[attr.name] == value).sum()),
                         "train_share": float(shares.get(value, 0.0)),
                         "population_share": None if target is None else target.get(value)} for value in attr.values}
        if target is None:
            status, under = "inconclusive", []
            reason = "the card declares no population shares"
        else:
            under = [value for value, share in target.items()
                     if share and float(shares.get(value, 0.0)) < min_ratio * share]
            status = "fail" if under else "pass"
            reason = ", ".join(f"{v}: {entry[v]['train_share']:.1%} of training against {target[v]:.1%} of the "
                               f"population" for v in under) or "every group within the threshold"
        for item in entry.values():
            share = item["population_share"]
            item["ratio"] = item["train_share"] / share if share else None
        report[attr.name] = {"groups": entry, "under_represented": under}
        ratios = [item["ratio"] for item in entry.values() if item["ratio"] is not None]
        checks.append({"id": f"bias.representation.{attr.name}", "grouping": attr.name, "metric": "representation",
                       "status": status, "statistic": "train_share / population_share (lowest)",
                       "value": min(ratios) if ratios else None, "interval": None, "threshold": min_ratio,
                       "reason": reason, "detail": "reports/bias/bias.md#representation"})
    return report, checks


def audit(samples: pd.DataFrame, card: DataCard, settings: BiasSettings) -> dict:
    """The whole audit as plain data (pure: no files)."""
    attributes = [attr.name for attr in card.sensitive_attributes]
    unseen = samples[samples["split"].isin(settings.splits)].reset_index(drop=True)
    metrics = [m for m in METRICS if unseen[METRICS[m][0]].notna().any()]
    skipped = [m for m in METRICS if m not in metrics]
    result: dict = {"dataset": card.name, "splits": list(settings.splits), "evaluated": int(len(unseen)),
                    "confidence": settings.confidence, "adjustment": settings.adjustment,
                    "n_boot": settings.n_boot, "max_n_boot": settings.max_n_boot, "power": settings.power,
                    "reference_groups": dict(settings.reference_groups), "min_group_size": settings.min_group_size,
                    "thresholds": {"max_relative_error_gap": settings.max_relative_error_gap,
                                   "max_accuracy_gap": settings.max_accuracy_gap,
                                   "min_representation_ratio": settings.min_representation_ratio},
                    "skipped_metrics": {m: "no labels: the probe and kNN did not run" for m in skipped},
                    "groupings": {}, "checks": []}
    if not attributes:
        result["note"] = f"card {card.name} declares no sensitive attributes: nothing to compare"
    for grouping in groupings(attributes):
        report, checks = audit_grouping(unseen, grouping, metrics, settings)
        result["groupings"][" x ".join(grouping)] = report
        result["checks"] += checks
    result["representation"], checks = representation(samples[samples["split"] == "train"], card,
                                                      settings.min_representation_ratio)
    result["checks"] += checks
    result["status"] = overall_status([check["status"] for check in result["checks"]])
    return result


def _anchor(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower())


def markdown(result: dict) -> str:
    level = f"{result['confidence']:.0%}"
    lines = [f"# Bias audit: {text(result['dataset'])}", "",
             f"**Status: {result['status'].upper()}** — {result['evaluated']} unseen images "
             f"(splits {', '.join(result['splits'])}). Each group is compared with a reference group (named in "
             "params, else the best-served) by a signed difference with a bootstrap interval, each group resampled "
             f"on its own; {level} confidence per metric and grouping, {result['adjustment']}-adjusted over its "
             f"comparisons. Resamples start at {result['n_boot']} and double, up to {result['max_n_boot']}, while a "
             "bound lies within its Monte-Carlo error (half-width of its 99.9% Monte-Carlo interval) of a "
             "tolerance. A check passes when its whole interval lies within ±tolerance, fails when it lies wholly "
             "beyond the tolerance in the harmful direction, and is inconclusive otherwise. The smallest detectable "
             f"gap is the true gap the interval would tell from none with {result['power']:.0%} power.", ""]
    if result.get("note"):
        lines += [text(result["note"]), ""]
    for metric, reason in result["skipped_metrics"].items():
        lines += [f"- {metric}: skipped ({reason})"]
    lines += ["", "| check | status | statistic | reference | value | interval | confidence | Monte-Carlo error | "
              "resamples | smallest detectable | tolerance |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for check in result["checks"]:
        confidence = check.get("confidence")
        lines.append(f"| {text(check['id'])} | {check['status']} | {check['statistic']} | "
                     f"{text(check.get('reference') or '—')} | {fmt(check['value'])} | {fmt(check['interval'])} | "
                     f"{'—' if confidence is None else f'{confidence:.2%}'} | {fmt(check.get('mc_error'))} | "
                     f"{fmt(check.get('n_boot'))} | {fmt((check.get('min_detectable') or {}).get('value'))} | "
                     f"{check['threshold']} |")
    reasons = [check for check in result["checks"] if check.get("reason") and check["status"] == "inconclusive"]
    if reasons:
        lines += ["", "Inconclusive:", ""] + [f"- {text(c['id'])}: {text(c['reason'])}" for c in reasons]
    for name, report in result["groupings"].items():
        lines += ["", f"## {text(name)}", "", f"![{text(name)}]({_anchor(name)}.png)", ""]
        if report["insufficient_data"]:
            lines.append(f"Insufficient data (fewer than {result['min_group_size']} samples, values withheld): "
                         + ", ".join(f"{text(g)} (n={report['counts'][g]})" for g in report["insufficient_data"]))
            lines.append("")
        for metric, entry in report["metrics"].items():
            lines += [f"### {metric}", ""]
            if entry.get("overall") is None:
                lines += ["Not enough groups with data to compare.", ""]
                continue
            needed = entry["required_group_size"]
            lines += [f"Overall {fmt(entry['overall'])} {fmt(entry['overall_interval'])}; reference "
                      f"{text(entry['reference'] or '—')} ({entry['reference_reason']}) "
                      f"{fmt(entry['reference_value'])}; "
                      f"{entry['comparisons']} comparison(s), {entry['statistic']}, {entry['harmful']} is worse. "
                      f"Detecting a gap at the tolerance ({entry['threshold']}) with {level} confidence needs about "
                      f"{needed if needed is not None else '—'} samples per group.", "",
                      "| group | n | value | interval | against the reference | interval | decision |",
                      "|---|---|---|---|---|---|---|"]
            for group, item in entry["groups"].items():
                if item["status"] != "ok":
                    lines.append(f"| {text(group)} | {item['count']} | insufficient data | | | | |")
                else:
                    lines.append(f"| {text(group)} | {item['count']} | {fmt(item['value'])} | {fmt(item['interval'])} | "
                                 f"{fmt(item.get('vs_reference'))} | {fmt(item.get('vs_reference_interval'))} | "
                                 f"{item.get('decision', 'reference' if group == entry['reference'] else '—')} |")
            lines.append("")
    lines += ["", "## Representation", "", "| attribute | group | training images | training share | "
              "population share | ratio |", "|---|---|---|---|---|---|"]
    for attr, entry in result["representation"].items():
        for group, item in entry["groups"].items():
            lines.append(f"| {text(attr)} | {text(group)} | {item['train_count']} | {item['train_share']:.1%} | "
                         f"{fmt(item['population_share'], 3)} | {fmt(item['ratio'], 3)} |")
    return "\n".join(lines) + "\n"


def figures(result: dict, folder: Path) -> None:
    """Per grouping: one panel per metric, each group's value with its interval; withheld groups marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for name, report in result["groupings"].items():
        metrics = report["metrics"]
        figure, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
        for axis, (metric, entry) in zip(axes[0], metrics.items()):
            groups = list(entry["groups"])
            ok = [g for g in groups if entry["groups"][g]["status"] == "ok"]
            values = [entry["groups"][g]["value"] for g in ok]
            errors = np.array([[entry["groups"][g]["value"] - entry["groups"][g]["interval"][0],
                                entry["groups"][g]["interval"][1] - entry["groups"][g]["value"]] for g in ok]).T
            axis.bar([drawn(g) for g in ok], values, yerr=errors if len(ok) else None, capsize=4, color="#4c78a8")
            for g in groups:
                if g not in ok:
                    axis.bar([drawn(g)], [0], color="none")
                    axis.annotate(f"insufficient\ndata (n={entry['groups'][g]['count']})", (groups.index(g), 0),
                                  ha="center", va="bottom", fontsize=7)
            if entry.get("overall") is not None:
                axis.axhline(entry["overall"], color="black", linestyle="--", linewidth=1, label="overall")
                axis.legend(fontsize=7)
            axis.set_title(metric.replace("_", " "), fontsize=9)
            axis.tick_params(axis="x", labelrotation=20, labelsize=7)
        figure.suptitle(f"{drawn(name)}: per-group values with {result['confidence']:.0%} intervals", fontsize=9)
        figure.tight_layout()
        figure.savefig(folder / f"{_anchor(name)}.png", dpi=110)
        plt.close(figure)


def check_references(card: DataCard, settings: BiasSettings, params_path: Path) -> None:
    """A reference group params name must be a value of one of the card's attributes."""
    values = {attr.name: attr.values for attr in card.sensitive_attributes}
    for attr, group in settings.reference_groups.items():
        where = f"{params_path}: audit_bias.reference_groups.{attr}"
        if attr not in values:
            raise PipelineError(f"{where}: card {card.name} has no sensitive attribute {attr!r} "
                                f"(it has: {', '.join(values) or 'none'})")
        if group not in values[attr]:
            raise PipelineError(f"{where}: {group!r} is not a value of {attr} (values: {', '.join(values[attr])})")


def audit_bias(params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"), eval_dir: Path = EVAL,
               model_dir: Path = MODEL_DIR, out: Path = BIAS_REPORT, log_to_mlflow: bool = True) -> dict:
    settings = load_params(params_path).audit_bias
    try:
        samples = pd.read_parquet(eval_dir / "samples.parquet")
        dataset = json.loads((model_dir / "config.json").read_text())["dataset"]
    except FileNotFoundError as exc:
        raise PipelineError(f"{exc.filename}: not found; run `dvc repro evaluate` first") from None
    card = load_card(card_path(dataset, cards_dir))
    check_references(card, settings, params_path)
    result = audit(samples, card, settings)
    out.mkdir(parents=True, exist_ok=True)
    figures(result, out)
    write_report(out, "bias", result, markdown(result), model_dir / "run.json" if log_to_mlflow else None)
    for check in result["checks"]:
        log.info("%s: %s (%s %s, interval %s, threshold %s)%s", check["id"], check["status"], check["statistic"],
                 fmt(check["value"]), fmt(check["interval"]), check["threshold"],
                 f": {check['reason']}" if check.get("reason") else "")
    return result
