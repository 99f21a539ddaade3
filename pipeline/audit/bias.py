"""The bias audit: does the model serve every group of people, and every intersection of groups, alike?

For each sensitive attribute of the card, and each intersection of two or more of them, fairlearn's
MetricFrame computes per-group reconstruction error and probe / kNN accuracy on images the model never
saw (audit_bias.splits), with bootstrap confidence intervals. A check compares the interval of the
worst-to-best disparity with a threshold from params (see pipeline.audit): the relative error gap
(worst group's error / best group's - 1) and the absolute accuracy gap (best - worst). Groups smaller
than audit_bias.min_group_size are reported as "insufficient data" with their count only, never with
values that could single people out, along with the group size that would detect the threshold gap.
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
from pipeline.audit import fmt, interval_decision, overall_status, write_report
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


def audit_grouping(samples: pd.DataFrame, grouping: tuple[str, ...], metrics: list[str],
                   settings: BiasSettings) -> tuple[dict, list[dict]]:
    """Per-group values with intervals for one grouping, and one check per metric."""
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
    if len(enough) >= 2:
        frame = MetricFrame(
            metrics={metric: _metric(kept[METRICS[metric][0]].to_numpy(dtype=np.float64)) for metric in metrics},
            y_true=np.arange(len(kept)), y_pred=np.zeros(len(kept)), sensitive_features=kept_labels,
            n_boot=settings.n_boot, ci_quantiles=[alpha / 2, 1 - alpha / 2], random_state=settings.seed)
    for metric in metrics:
        column, lower_is_better = METRICS[metric]
        threshold = settings.max_relative_error_gap if lower_is_better else settings.max_accuracy_gap
        entry, check = _metric_result(frame, metric, column, lower_is_better, threshold, kept, kept_labels, counts,
                                      enough, settings)
        entry["threshold"] = threshold
        report["metrics"][metric] = entry
        checks.append({"id": f"bias.{metric}.{name}", "grouping": name, "metric": metric, **check,
                       "threshold": threshold, "detail": f"reports/bias/bias.md#{_anchor(name)}"})
    return report, checks


def _metric_result(frame, metric, column, lower_is_better, threshold, kept, kept_labels, counts, enough, settings):
    statistic = "relative_error_gap" if lower_is_better else "accuracy_gap"
    values = kept[column].to_numpy(dtype=np.float64)
    spread = float(np.nanstd(values)) if len(values) else float("nan")
    groups: dict[str, dict] = {}
    for group, count in counts.items():
        if group not in enough:
            groups[str(group)] = {"count": int(count), "status": "insufficient data"}
    if frame is None:
        check = {"status": "inconclusive", "statistic": statistic, "value": None, "interval": None,
                 "reason": f"fewer than two groups with at least {settings.min_group_size} samples"}
        return {"groups": groups, "overall": None}, check

    by_group = frame.by_group[metric]
    low, high = (frame.by_group_ci[0][metric], frame.by_group_ci[1][metric])
    overall = float(frame.overall[metric])
    best = float(by_group.min() if lower_is_better else by_group.max())
    worst_group = str(by_group.idxmax() if lower_is_better else by_group.idxmin())
    for group, value in by_group.items():
        value = float(value)
        groups[str(group)] = {
            "count": int(counts[group]), "status": "ok", "value": value, "interval": [float(low[group]),
                                                                                     float(high[group])],
            "gap_to_best": abs(value - best), "ratio_to_best": value / best if best else None,
            "gap_to_overall": value - overall, "ratio_to_overall": value / overall if overall else None}
    if lower_is_better:  # min/max ratio -> worst/best - 1, a monotone map, so its interval maps too
        ratio, (ratio_low, ratio_high) = float(frame.ratio()[metric]), (float(v[metric]) for v in frame.ratio_ci())
        value, interval = 1 / ratio - 1, [1 / ratio_high - 1, 1 / ratio_low - 1]
        effect = threshold * best
    else:
        value = float(frame.difference()[metric])
        interval = [float(v[metric]) for v in frame.difference_ci()]
        effect = threshold
    entry = {
        "overall": overall, "overall_interval": [float(v[metric]) for v in frame.overall_ci],
        "best": best, "worst_group": worst_group, "worst_value": float(by_group[worst_group]),
        "worst_interval": groups[worst_group]["interval"], statistic: value, f"{statistic}_interval": interval,
        "required_group_size": required_group_size(spread, effect, settings.confidence, settings.power),
        "groups": groups,
    }
    check = {"status": interval_decision(*interval, threshold), "statistic": statistic, "value": value,
             "interval": interval, "worst_group": worst_group}
    return entry, check


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
                    "confidence": settings.confidence, "n_boot": settings.n_boot,
                    "min_group_size": settings.min_group_size,
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
    lines = [f"# Bias audit: {result['dataset']}", "",
             f"**Status: {result['status'].upper()}** — {result['evaluated']} unseen images "
             f"(splits {', '.join(result['splits'])}), {level} bootstrap intervals ({result['n_boot']} resamples). "
             "A check fails only when its whole interval lies beyond the threshold and passes only when it lies "
             "within; otherwise it is inconclusive.", ""]
    if result.get("note"):
        lines += [result["note"], ""]
    for metric, reason in result["skipped_metrics"].items():
        lines += [f"- {metric}: skipped ({reason})"]
    lines += ["", "| check | status | statistic | value | interval | threshold | worst group |",
              "|---|---|---|---|---|---|---|"]
    for check in result["checks"]:
        lines.append(f"| {check['id']} | {check['status']} | {check['statistic']} | {fmt(check['value'])} | "
                     f"{fmt(check['interval'])} | {check['threshold']} | {check.get('worst_group') or '—'} |")
    for name, report in result["groupings"].items():
        lines += ["", f"## {name}", "", f"![{name}]({_anchor(name)}.png)", ""]
        if report["insufficient_data"]:
            lines.append(f"Insufficient data (fewer than {result['min_group_size']} samples, values withheld): "
                         + ", ".join(f"{g} (n={report['counts'][g]})" for g in report["insufficient_data"]))
            lines.append("")
        for metric, entry in report["metrics"].items():
            lines += [f"### {metric}", ""]
            if entry.get("overall") is None:
                lines += ["Not enough groups with data to compare.", ""]
                continue
            needed = entry["required_group_size"]
            lines += [f"Overall {fmt(entry['overall'])} {fmt(entry['overall_interval'])}; worst group "
                      f"{entry['worst_group']} {fmt(entry['worst_value'])} {fmt(entry['worst_interval'])}. "
                      f"Detecting a gap at the threshold ({entry['threshold']}) with {level} confidence needs about "
                      f"{needed if needed is not None else '—'} samples per group.", "",
                      "| group | n | value | interval | gap to best | ratio to best | gap to overall |",
                      "|---|---|---|---|---|---|---|"]
            for group, item in entry["groups"].items():
                if item["status"] != "ok":
                    lines.append(f"| {group} | {item['count']} | insufficient data | | | | |")
                else:
                    lines.append(f"| {group} | {item['count']} | {fmt(item['value'])} | {fmt(item['interval'])} | "
                                 f"{fmt(item['gap_to_best'])} | {fmt(item['ratio_to_best'], 3)} | "
                                 f"{fmt(item['gap_to_overall'])} |")
            lines.append("")
    lines += ["", "## Representation", "", "| attribute | group | training images | training share | "
              "population share | ratio |", "|---|---|---|---|---|---|"]
    for attr, entry in result["representation"].items():
        for group, item in entry["groups"].items():
            lines.append(f"| {attr} | {group} | {item['train_count']} | {item['train_share']:.1%} | "
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
            axis.bar(ok, values, yerr=errors if len(ok) else None, capsize=4, color="#4c78a8")
            for g in groups:
                if g not in ok:
                    axis.bar([g], [0], color="none")
                    axis.annotate(f"insufficient\ndata (n={entry['groups'][g]['count']})", (groups.index(g), 0),
                                  ha="center", va="bottom", fontsize=7)
            if entry.get("overall") is not None:
                axis.axhline(entry["overall"], color="black", linestyle="--", linewidth=1, label="overall")
                axis.legend(fontsize=7)
            axis.set_title(metric.replace("_", " "), fontsize=9)
            axis.tick_params(axis="x", labelrotation=20, labelsize=7)
        figure.suptitle(f"{name}: per-group values with {result['confidence']:.0%} intervals", fontsize=9)
        figure.tight_layout()
        figure.savefig(folder / f"{_anchor(name)}.png", dpi=110)
        plt.close(figure)


def audit_bias(params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"), eval_dir: Path = EVAL,
               model_dir: Path = MODEL_DIR, out: Path = BIAS_REPORT, log_to_mlflow: bool = True) -> dict:
    settings = load_params(params_path).audit_bias
    try:
        samples = pd.read_parquet(eval_dir / "samples.parquet")
        dataset = json.loads((model_dir / "config.json").read_text())["dataset"]
    except FileNotFoundError as exc:
        raise PipelineError(f"{exc.filename}: not found; run `dvc repro evaluate` first") from None
    card = load_card(card_path(dataset, cards_dir))
    result = audit(samples, card, settings)
    out.mkdir(parents=True, exist_ok=True)
    figures(result, out)
    write_report(out, "bias", result, markdown(result), model_dir / "run.json" if log_to_mlflow else None)
    for check in result["checks"]:
        log.info("%s: %s (%s %s, interval %s, threshold %s)", check["id"], check["status"], check["statistic"],
                 fmt(check["value"]), fmt(check["interval"]), check["threshold"])
    return result
