"""The bias audit: does the model serve every group of people, and every intersection of groups, alike?

For each sensitive attribute of the card, and each intersection of two or more of them, fairlearn's MetricFrame
computes per-group reconstruction error and probe / kNN accuracy on images the model never saw (audit_bias.splits);
each group's value has a bootstrap interval by the comparisons' method (BCa; fairlearn's own bootstrap, percentile
and row by row, took 100 s of a 2-minute audit on 8,000 images). Each group is then compared with a reference fixed
before looking at the data: the group audit_bias.reference_groups names, else the pooled rest (every other group of
the grouping). Picking the best-served group from the same data would bias the comparison (family-wise coverage 0.91
with three groups) and change the check ids from one version to the next; against the pooled rest every group has
its own check, `bias.<metric>.<grouping>=<group>`, whichever group is best served. The statistic is signed: error /
the reference's - 1 and accuracy - the reference's, bootstrapped with each side resampled on its own
(pipeline.audit.stats). A check passes when its interval lies within ±tolerance (an equivalence test), fails when it
lies wholly beyond the tolerance in the harmful direction, and is inconclusive otherwise. With more than two groups
the confidence is adjusted over the groups compared (audit_bias.adjustment); with two, the two checks are one
comparison seen from either side (each group against the other), so the confidence is not divided.
Groups smaller than audit_bias.min_group_size are reported as "insufficient data" with their count only, never
with values that could single people out, along with the images that would settle the check.
Representation: each group's share of the training data against the card's target population share.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import PipelineError
from pipeline.artifacts import BIAS, Layout
from pipeline.audit import log_audit, overall_status, publish
from pipeline.audit.stats import Criterion, adjusted_confidence, compare, mean_interval, operating, settle_sentence
from pipeline.cards import DataCard, card_path, load_card
from pipeline.contracts import (
    BiasResult,
    BiasThresholds,
    Check,
    GroupingReport,
    GroupValue,
    MetricComparison,
    Representation,
    RepresentationGroup,
)
from pipeline.params import DEFAULT_PARAMS, BiasSettings, load_params
from pipeline.render import (
    anchor,
    checks_table,
    drawn,
    evidence_table,
    figure,
    fmt,
    inconclusive_list,
    pyplot,
    representation_table,
    save_figure,
    table,
    text,
)

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


def _metric(values: np.ndarray):
    """A MetricFrame metric over row positions (y_true), so one bootstrap serves every metric."""
    return lambda rows, _unused: float(np.nanmean(values[np.asarray(rows, dtype=int)]))


REST = "the other groups"


def reference_group(grouping: tuple[str, ...], named: dict[str, str]) -> tuple[str, str]:
    """The reference every group is compared with, and why: the group params name for each attribute of the
    grouping, else the pooled rest of the groups (never one chosen from the data)."""
    if all(attr in named for attr in grouping):
        return " & ".join(named[attr] for attr in grouping), "named in audit_bias.reference_groups"
    return REST, "pooled: each group against every other group of the grouping (declared, not chosen from the data)"


def comparisons_in(compared: int, reference: str) -> int:
    """The comparisons a family's confidence is divided over: against the pooled rest, two groups make one
    comparison seen from both sides."""
    return 1 if reference == REST and compared == 2 else compared


def audit_grouping(samples: pd.DataFrame, grouping: tuple[str, ...], metrics: list[str],
                   settings: BiasSettings) -> tuple[GroupingReport, list[Check]]:
    """Per-group values with intervals for one grouping, and per metric one check for each group but the
    reference."""
    from fairlearn.metrics import MetricFrame

    labels = group_labels(samples, grouping)
    counts = labels.value_counts().sort_index()
    enough = counts[counts >= max(settings.min_group_size, 2)].index  # a bootstrap needs two samples a group
    kept = samples[labels.isin(enough).to_numpy()].reset_index(drop=True)
    kept_labels = labels[labels.isin(enough)].reset_index(drop=True)
    frame = None
    if len(enough):
        frame = MetricFrame(
            metrics={metric: _metric(kept[METRICS[metric][0]].to_numpy(dtype=np.float64)) for metric in metrics},
            y_true=np.arange(len(kept)), y_pred=np.zeros(len(kept)), sensitive_features=kept_labels)
    entries, checks = {}, []
    for metric in metrics:
        entries[metric], metric_checks = compare_groups(frame, metric, grouping, kept, kept_labels, counts, enough,
                                                        settings)
        checks += metric_checks
    report = GroupingReport(grouping=list(grouping), counts={str(k): int(v) for k, v in counts.items()},
                            insufficient_data=[str(g) for g in counts.index if g not in enough], metrics=entries)
    return report, checks


def compare_groups(frame, metric, grouping, kept, kept_labels, counts, enough,
                   settings: BiasSettings) -> tuple[MetricComparison, list[Check]]:
    """One metric of one grouping: each group against the reference. `frame` (fairlearn's MetricFrame with its
    per-group intervals, the costly part) may be None where only the checks are wanted."""
    name = " x ".join(grouping)
    column, lower_is_better = METRICS[metric]
    threshold = settings.max_relative_error_gap if lower_is_better else settings.max_accuracy_gap
    criterion = Criterion(threshold, "higher" if lower_is_better else "lower", equivalence=True)
    kind, statistic = (("relative", "group error / reference error - 1") if lower_is_better
                       else ("difference", "group accuracy - reference accuracy"))
    common = dict(area="bias", grouping=name, metric=metric, statistic=statistic, threshold=threshold,
                  detail=f"{BIAS}/bias.md#{anchor(name)}")
    described = dict(statistic=statistic, threshold=threshold, test=criterion.test, harmful=criterion.harmful)
    values = kept[column].to_numpy(dtype=np.float64)
    groups = {str(g): GroupValue(count=int(c), status="insufficient data") for g, c in counts.items()
              if g not in enough}
    if len(counts) < 2:
        check = Check(id=f"bias.{metric}.{name}", status="inconclusive",
                      reason="fewer than two groups among the evaluated images: nothing to compare", **common)
        return MetricComparison(groups=groups, **described), [check]
    labels = kept_labels.to_numpy()
    overall, overall_interval = None, None
    if frame is not None:
        overall = float(frame.overall[metric])
        overall_interval = mean_interval(values, settings.confidence, settings.n_boot, settings.seed)
        for position, (group, value) in enumerate(frame.by_group[metric].items()):
            interval = mean_interval(values[labels == group], settings.confidence, settings.n_boot,
                                     [settings.seed, position])
            groups[str(group)] = GroupValue(count=int(counts[group]), status="ok", value=float(value),
                                            interval=interval)
    reference, why = reference_group(grouping, settings.reference_groups)
    compared = [g for g in enough if g != reference]
    comparisons = comparisons_in(len(compared), reference)
    confidence = adjusted_confidence(settings.confidence, comparisons, settings.adjustment)
    reference_value = float(np.nanmean(values[labels == reference])) if reference in enough else None
    checks = []
    for position, group in enumerate(counts.index):
        if group == reference:
            continue
        fields = dict(id=f"bias.{metric}.{name}={group}", group=str(group),
                      reference=reference if reference != REST else f"{REST} ({name} != {group})", **common)
        others = values[labels != group] if reference == REST else values[labels == reference]
        if group not in enough:
            sizing = operating(others, others, kind, criterion, confidence, False, 0.0) if len(others) > 1 else None
            settle = settle_sentence(sizing)
            checks.append(Check(status="inconclusive", **fields,
                                reason=f"insufficient data: {int(counts[group])} samples, fewer than "
                                       f"{settings.min_group_size}" + (f"; {settle}" if settle else "")))
        elif reference != REST and reference not in enough:
            checks.append(Check(status="inconclusive", **fields, reason=f"the reference group {reference} has fewer "
                                                                        f"than {settings.min_group_size} samples"))
        elif len(others) < 2:
            checks.append(Check(status="inconclusive", **fields, reason=f"no other group has {settings.min_group_size} "
                                                                        "samples or more: nothing to compare with"))
        else:
            comparison = compare(others, values[labels == group], kind, criterion, settings,
                                 seed=[settings.seed, position], comparisons=comparisons,
                                 adjustment=settings.adjustment)
            checks.append(Check.decided(comparison, **fields))
            measured = groups.get(str(group), GroupValue(count=int(counts[group]), status="ok"))
            groups[str(group)] = measured.model_copy(update=dict(
                vs_reference=comparison.value, vs_reference_interval=comparison.interval, decision=comparison.status))
    return MetricComparison(groups=groups, overall=overall, overall_interval=overall_interval, reference=reference,
                            reference_reason=why, comparisons=comparisons, reference_value=reference_value,
                            **described), checks


def unpassable(unseen: pd.DataFrame, groupings_: list[tuple[str, ...]], metrics: list[str],
               settings: BiasSettings) -> list[str]:
    """One line per check that cannot pass at these sizes (its interval would be wider than ±tolerance even with
    no gap), naming the images it would need: said before the audit spends its time, since such params can only
    give inconclusive or fail."""
    lines = []
    for grouping in groupings_:
        labels = group_labels(unseen, grouping).to_numpy()
        counts = pd.Series(labels).value_counts()
        enough = [g for g in sorted(counts.index) if counts[g] >= max(settings.min_group_size, 2)]
        reference, _ = reference_group(grouping, settings.reference_groups)
        compared = [g for g in enough if g != reference]
        confidence = adjusted_confidence(settings.confidence, comparisons_in(len(compared), reference),
                                         settings.adjustment)
        for metric in metrics:
            column, lower_is_better = METRICS[metric]
            values = unseen[column].to_numpy(dtype=np.float64)
            kind = "relative" if lower_is_better else "difference"
            criterion = Criterion(settings.max_relative_error_gap if lower_is_better else settings.max_accuracy_gap,
                                  "higher" if lower_is_better else "lower")
            for group in compared:
                others = values[labels != group] if reference == REST else values[labels == reference]
                mine = values[labels == group]
                others, mine = others[~np.isnan(others)], mine[~np.isnan(mine)]
                if min(len(others), len(mine)) < 2:
                    continue
                sizing = operating(others, mine, kind, criterion, confidence, False, 0.0)
                if sizing.points[0].p_pass < 0.01:
                    need = sizing.for_pass
                    lines.append(f"bias.{metric}.{' x '.join(grouping)}={group} cannot pass at these sizes "
                                 f"({len(mine)} against {len(others)} images: its {confidence:.2%} interval is wider "
                                 f"than ±{criterion.threshold}); an 80% pass at no gap needs about "
                                 + (f"{need.sample} against {need.reference}" if need else "more than can be had"))
    return lines


def representation(train: pd.DataFrame, card: DataCard,
                   min_ratio: float) -> tuple[dict[str, Representation], list[Check]]:
    """Each group's share of the training images against the card's target population share."""
    report, checks = {}, []
    for attr in card.sensitive_attributes:
        shares = train[attr.name].value_counts(normalize=True)
        target = attr.population_shares
        groups = {}
        for value in attr.values:
            share = None if target is None else target.get(value)
            train_share = float(shares.get(value, 0.0))
            groups[value] = RepresentationGroup(train_count=int((train[attr.name] == value).sum()),
                                                train_share=train_share, population_share=share,
                                                ratio=train_share / share if share else None)
        if target is None:
            status, under = "inconclusive", []
            reason = "the card declares no population shares"
        else:
            under = [value for value, share in target.items()
                     if share and float(shares.get(value, 0.0)) < min_ratio * share]
            status = "fail" if under else "pass"
            reason = ", ".join(f"{v}: {groups[v].train_share:.1%} of training against {target[v]:.1%} of the "
                               f"population" for v in under) or "every group within the threshold"
        report[attr.name] = Representation(groups=groups, under_represented=under)
        ratios = [item.ratio for item in groups.values() if item.ratio is not None]
        checks.append(Check(id=f"bias.representation.{attr.name}", area="bias", grouping=attr.name,
                            metric="representation", status=status,
                            statistic="train_share / population_share (lowest)", value=min(ratios) if ratios else None,
                            threshold=min_ratio, reason=reason, detail=f"{BIAS}/bias.md#representation"))
    return report, checks


def audit(samples: pd.DataFrame, card: DataCard, settings: BiasSettings) -> BiasResult:
    """The whole audit (pure: no files)."""
    attributes = [attr.name for attr in card.sensitive_attributes]
    unseen = samples[samples["split"].isin(settings.splits)].reset_index(drop=True)
    metrics = [m for m in METRICS if unseen[METRICS[m][0]].notna().any()]
    for line in unpassable(unseen, groupings(attributes), metrics, settings):
        log.warning("%s", line)
    reports, checks = {}, []
    for grouping in groupings(attributes):
        reports[" x ".join(grouping)], found = audit_grouping(unseen, grouping, metrics, settings)
        checks += found
    represented, found = representation(samples[samples["split"] == "train"], card, settings.min_representation_ratio)
    checks += found
    return BiasResult(
        dataset=card.name, splits=list(settings.splits), evaluated=len(unseen), confidence=settings.confidence,
        adjustment=settings.adjustment, n_boot=settings.n_boot, max_n_boot=settings.max_n_boot, power=settings.power,
        reference_groups=dict(settings.reference_groups), min_group_size=settings.min_group_size,
        thresholds=BiasThresholds(max_relative_error_gap=settings.max_relative_error_gap,
                                  max_accuracy_gap=settings.max_accuracy_gap,
                                  min_representation_ratio=settings.min_representation_ratio),
        skipped_metrics={m: "no labels: the probe and kNN did not run" for m in METRICS if m not in metrics},
        note=None if attributes else f"card {card.name} declares no sensitive attributes: nothing to compare",
        groupings=reports, representation=represented, checks=checks,
        status=overall_status([check.status for check in checks]))


def markdown(result: BiasResult) -> str:
    level = f"{result.confidence:.0%}"
    lines = [f"# Bias audit: {text(result.dataset)}", "",
             f"**Status: {result.status.upper()}** — {result.evaluated} unseen images "
             f"(splits {', '.join(result.splits)}). Each group is compared with a reference declared before the data "
             "was seen (the group named in params, else the pooled other groups) by a signed difference with a "
             "bootstrap interval (BCa), each side resampled on its own; "
             f"{level} confidence per metric and grouping, {result.adjustment}-adjusted over its comparisons. "
             f"Resamples start at {result.n_boot} and double, up to {result.max_n_boot}, while a "
             "bound lies within its Monte-Carlo error (half-width of its 99.9% Monte-Carlo interval) of a "
             "tolerance. A check passes when its whole interval lies within ±tolerance, fails when it lies wholly "
             "beyond the tolerance in the harmful direction, and is inconclusive otherwise. Each check states what "
             "this decision catches at its sizes: P(pass) and P(fail) if the true gap were none, the tolerance, and "
             "twice the tolerance.", ""]
    if result.note:
        lines += [text(result.note), ""]
    skipped = [f"- {metric}: skipped ({reason})" for metric, reason in result.skipped_metrics.items()]
    lines += (skipped + [""] if skipped else []) + checks_table(result.checks) + evidence_table(result.checks)
    lines += inconclusive_list(result.checks)
    for name, report in result.groupings.items():
        lines += [f"## {text(name)}", ""] + figure(f"{anchor(name)}.png", f"{name}: per-group values")
        if report.insufficient_data:
            lines += [f"Insufficient data (fewer than {result.min_group_size} samples, values withheld): "
                      + ", ".join(f"{text(g)} (n={report.counts[g]})" for g in report.insufficient_data), ""]
        for metric, entry in report.metrics.items():
            lines += [f"### {metric}", ""]
            if entry.overall is None:
                lines += ["Not enough groups with data to compare.", ""]
                continue
            lines += [f"Overall {fmt(entry.overall)} {fmt(entry.overall_interval)}; reference "
                      f"{text(entry.reference or '—')} ({entry.reference_reason}) {fmt(entry.reference_value)}; "
                      f"{entry.comparisons} comparison(s), {entry.statistic}, {entry.harmful} is worse.", ""]
            lines += table(["group", "n", "value", "interval", "against the reference", "interval", "decision"],
                           [[text(group), item.count, "insufficient data", "", "", "", ""] if item.status != "ok" else
                            [text(group), item.count, fmt(item.value), fmt(item.interval), fmt(item.vs_reference),
                             fmt(item.vs_reference_interval),
                             item.decision or ("reference" if group == entry.reference else "—")]
                            for group, item in entry.groups.items()])
    lines += ["## Representation", ""] + representation_table(result)
    return "\n".join(lines).rstrip() + "\n"


def figures(result: BiasResult, folder: Path) -> None:
    """Per grouping: one panel per metric, each group's value with its interval; withheld groups marked."""
    plt = pyplot()
    for name, report in result.groupings.items():
        metrics = report.metrics
        shown, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.4), squeeze=False)
        for axis, (metric, entry) in zip(axes[0], metrics.items()):
            groups = list(entry.groups)
            ok = [g for g in groups if entry.groups[g].status == "ok"]
            values = [entry.groups[g].value for g in ok]
            errors = np.array([[entry.groups[g].value - entry.groups[g].interval[0],
                                entry.groups[g].interval[1] - entry.groups[g].value] for g in ok]).T
            axis.bar([drawn(g) for g in ok], values, yerr=errors if len(ok) else None, capsize=4, color="#4c78a8")
            for g in groups:
                if g not in ok:
                    axis.bar([drawn(g)], [0], color="none")
                    axis.annotate(f"insufficient\ndata (n={entry.groups[g].count})", (groups.index(g), 0),
                                  ha="center", va="bottom", fontsize=7)
            if entry.overall is not None:
                axis.axhline(entry.overall, color="black", linestyle="--", linewidth=1, label="overall")
                axis.legend(fontsize=7)
            axis.set_title(metric.replace("_", " "), fontsize=9)
            axis.tick_params(axis="x", labelrotation=20, labelsize=7)
        shown.suptitle(f"{drawn(name)}: per-group values with {result.confidence:.0%} intervals", fontsize=9)
        shown.tight_layout()
        save_figure(shown, folder / f"{anchor(name)}.png")


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


def audit_bias(params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"), layout: Layout = Layout(),
               log_to_mlflow: bool = True) -> BiasResult:
    settings = load_params(params_path).audit_bias
    samples = layout.samples()
    card = load_card(card_path(layout.config().dataset, cards_dir))
    check_references(card, settings, params_path)
    result = audit(samples, card, settings)
    with layout.writing(layout.bias) as staged:
        figures(result, staged(layout.bias))
        publish(staged(layout.bias), "bias", result, markdown(result))
    if log_to_mlflow:
        log_audit(layout.bias, "bias", result.status, layout.run_file)
    for check in result.checks:
        log.info("%s: %s (%s %s, interval %s, threshold %s)%s", check.id, check.status, check.statistic,
                 fmt(check.value), fmt(check.interval), check.threshold, f": {check.reason}" if check.reason else "")
    return result
