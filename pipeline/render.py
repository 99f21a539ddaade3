"""One way to write what a reviewer reads: numbers, card values made inert, Markdown tables and figures, the
check tables every report shows (bias.md, shift.md, report.md, model_card.md, README's results), and
matplotlib figures saved the same way by every stage.

Every value from a card or a metadata file passes through `text()` (or `code()` for an identifier), so it cannot
open a link, an image, HTML or a table cell; figure labels pass through `drawn()` (no mathtext).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from pipeline.contracts import BiasResult, Check, Corruptions

_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]<>!|~&#])")


def fmt(value, digits: int = 4) -> str:
    """A number, an interval or a missing value as report text."""
    if value is None:
        return "—"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def text(value) -> str:
    """A card or metadata value as inert Markdown: one line, every character that could start markup escaped,
    so a value cannot inject HTML, script, links or images into a report, or split a table cell."""
    return _MARKDOWN_SPECIAL.sub(r"\\\1", " ".join(str(value).split()))


def code(value) -> str:
    """An identifier as a code span; a value that could close the span or split a table cell (a backtick or a
    pipe) is shown as escaped text instead."""
    value = " ".join(str(value).split())
    return text(value) if "`" in value or "|" in value else f"`{value}`"


def drawn(value) -> str:
    """A card or metadata value as matplotlib draws it, literally: paired `$` would otherwise start mathtext."""
    return str(value).replace("$", r"\$")


def table(header: list[str], rows: Iterable[list]) -> list[str]:
    """A Markdown table; cells are written as given, so card values must already be `text()` or `code()`."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows] + [""]


def figure(source: str, caption: str) -> list[str]:
    """A figure with its caption below it."""
    return [f"![{text(caption)}]({source})", "", f"*{text(caption)}*", ""]


def anchor(value: str) -> str:
    """The heading anchor a Markdown renderer gives `value` (also the figure file name of a grouping)."""
    return "".join(c if c.isalnum() else "-" for c in value.lower())


# ---------------------------------------------------------------- checks

def _status(check: Check) -> str:
    return check.status.upper() if check.status == "fail" else check.status


def checks_table(checks: list[Check]) -> list[str]:
    """Every check's decision: status, (once the release decided it) whether it blocks, value, interval,
    threshold and where its detail is."""
    decided = any(c.blocking is not None for c in checks)
    header = ["check", "status"] + (["blocking"] if decided else []) + ["statistic", "value", "interval",
                                                                        "threshold", "detail"]
    rows = []
    for c in checks:
        threshold = fmt(c.threshold) if c.threshold is None else c.threshold
        rows.append([text(c.id), _status(c)] + (["advisory" if c.blocking is False else "yes"] if decided else [])
                    + [text(c.statistic), fmt(c.value), fmt(c.interval), text(threshold), code(c.detail)])
    return table(header, rows)


def _confidence(c: Check) -> str:
    if not c.confidence:
        return "—"
    if c.adjustment is not None and c.adjustment.comparisons > 1:
        return (f"{c.confidence:.2%} ({c.adjustment.method}, {c.adjustment.comparisons} comparisons, family "
                f"{c.adjustment.family_confidence:.0%})")
    return f"{c.confidence:.0%}"


def operating_sentence(c: Check) -> str:
    """What this decision catches at its sizes: P(pass) / P(fail) at each true value, and the sizes that would
    settle it."""
    if c.operating is None:
        return ""
    o = c.operating
    points = "; ".join(f"{p.label} ({fmt(p.value, 3)}): P(pass) {fmt(p.p_pass, 3)}, P(fail) {fmt(p.p_fail, 3)}"
                       for p in o.points)
    sizes = []
    if o.for_pass is not None:
        sizes.append(f"80% pass at no gap needs {o.for_pass.sample} (reference {o.for_pass.reference})")
    if o.for_fail is not None:
        sizes.append(f"80% fail at twice the tolerance needs {o.for_fail.sample} (reference {o.for_fail.reference})")
    size = f"{o.n_sample} against {o.n_reference}" + (" pairs" if o.paired else "")
    return f"at {size}: {points}" + (f"; {'; '.join(sizes)}" if sizes else "")


def _could_detect(c: Check) -> str:
    """What the check catches: the decision's operating characteristics at its sizes, and for a drift test that
    found nothing, the power at each simulated mixture share."""
    if c.power is not None:
        share = c.power.detectable_share
        curve = ", ".join(f"{p.share:.0%}: {fmt(p.power, 2)}" for p in c.power.curve)
        found = f"a {share:.0%} share of held-out-domain images" if share is not None else "no simulated share"
        return f"{found} (power by share: {curve})"
    return operating_sentence(c) or "—"


def evidence_table(checks: list[Check]) -> list[str]:
    """How each decided check was decided: against what, by which test, at which (adjusted) confidence, how far the
    bounds could move with another resampling seed, the p-value of a test, and what the check could have found."""
    rows = [[text(c.id), text(c.reference or "—"), c.test or ("MMD permutation" if c.p_value is not None else "—"),
             f"{c.harmful} is worse" if c.harmful else "—", _confidence(c), fmt(c.n_boot or c.permutations),
             fmt(c.mc_error, 4),
             f"{c.p_value:.4f}" + (f" (alpha {c.alpha})" if c.alpha else "") if c.p_value is not None else "—",
             _could_detect(c), text(c.reason or "")]
            for c in checks if c.reference is not None or c.p_value is not None or c.operating is not None]
    if not rows:
        return []
    return ["How each check was decided (MC error: the Monte-Carlo error of each bound or p-value, so a decision "
            "does not hang on the resampling seed; a bound within it of the threshold is inconclusive):", ""] + table(
        ["check", "reference", "test", "direction", "confidence", "resamples", "MC error", "p-value",
         "what this decision catches at these sizes", "reason"], rows)


def inconclusive_list(checks: list[Check]) -> list[str]:
    reasons = [c for c in checks if c.reason and c.status == "inconclusive"]
    return ["Inconclusive:", ""] + [f"- {text(c.id)}: {text(c.reason)}" for c in reasons] + [""] if reasons else []


# ---------------------------------------------------------------- audit results shown in more than one report

def representation_table(result: BiasResult) -> list[str]:
    """Each group's share of the training images against the card's population share (bias.md, report.md)."""
    return table(["attribute", "group", "training images", "training share", "population share", "ratio"],
                 [[text(attr), text(group), item.train_count, f"{item.train_share:.1%}",
                   fmt(item.population_share, 3), fmt(item.ratio, 3)]
                  for attr, entry in result.representation.items() for group, item in entry.groups.items()])


def corruption_sentence(suite: Corruptions, check: Check) -> str:
    """The corruption result with its interval, and which measurement decided it and why (shift.md, report.md)."""
    head = f"Corruptions ({suite.images} unseen images, six corruptions at five severities): "
    interval = f"{check.confidence:.0%} interval {fmt(check.interval, 3)} (paired bootstrap over images)"
    reconstruction = f"mean reconstruction error {fmt(suite.relative_mce_reconstruction, 3)} times the clean error"
    if suite.decided_by == "reconstruction":
        return (head + f"{reconstruction}, {interval}, against at most {check.threshold}: **{check.status}** (no "
                "labels, so no probe to judge).")
    return (head + f"probe accuracy under corruption minus clean accuracy {fmt(check.value, 3)} (clean "
            f"{fmt(suite.clean.probe_accuracy, 3)}), {interval}, against a drop of at most {check.threshold}: "
            f"**{check.status}**; "
            + (f"mean probe error {fmt(suite.relative_mce_probe, 3)} times the clean error"
               if suite.relative_mce_probe is not None else "no clean probe error, so no error ratio")
            + ". Decided "
            f"on the probe, as ImageNet-C decides on the classifier: the {reconstruction} is reported, not judged, "
            "because a brightness or contrast change shows in every visible patch, so any raw-pixel reconstructor "
            "carries it into the hidden pixels and that error grows with the corruption, not with the model's "
            "weakness.")


# ---------------------------------------------------------------- matplotlib

def pyplot():
    """matplotlib's pyplot on the file-only backend (stages run without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure, path: Path, dpi: int = 110) -> Path:
    """Write the figure and free it."""
    figure.savefig(path, dpi=dpi)
    pyplot().close(figure)
    return path
