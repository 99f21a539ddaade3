"""The memorization audit: does the model reconstruct the images it was trained on better than images of the same
domains it never saw (val, test)? A model that does has memorised its training data, a privacy risk for the people
in it. This is the one place memorization is measured; the report stage runs it on evaluate's per-sample table.

Per image the hidden-pixel reconstruction error; the statistic is unseen mean error / training mean error - 1
(`compare`, "relative", training images as the reference, each side resampled on its own), overall and per
sensitive group. One-sided (non-inferiority): only an unseen error above the training error beyond
`report.max_memorization_gap` is harmful. A group with fewer than `audit_bias.min_group_size` images on a side is
inconclusive, with counts only.
"""

from __future__ import annotations

import pandas as pd

from pipeline.artifacts import GOVERNANCE, UNSEEN
from pipeline.audit.stats import Criterion, compare
from pipeline.contracts import Check, MemorizationRow
from pipeline.params import ReportSettings

DETAIL = f"{GOVERNANCE}/report.md#memorization"


def memorization(samples: pd.DataFrame, attributes: list[str], settings: ReportSettings,
                 min_group_size: int) -> tuple[list[Check], dict[str, MemorizationRow]]:
    """One check per part (overall, then each group of each attribute) and the table the report shows."""
    criterion = Criterion(settings.max_memorization_gap, "higher", equivalence=False)
    parts = [("overall", samples)] + [(f"{attr}={value}", part) for attr in attributes
                                      for value, part in samples.groupby(attr)]
    checks, rows = [], {}
    for position, (name, part) in enumerate(parts):
        seen = part.loc[part["split"] == "train", "recon_mse"].to_numpy()
        unseen = part.loc[part["split"].isin(UNSEEN), "recon_mse"].to_numpy()
        fields = dict(id=f"memorization.{name}", area="memorization", statistic="unseen error / training error - 1",
                      threshold=settings.max_memorization_gap, detail=DETAIL, reference="training images")
        if min(len(seen), len(unseen)) < max(min_group_size, 2):  # a bootstrap needs two images a side
            note = f"insufficient data (fewer than {min_group_size} images on a side)"
            check = Check(status="inconclusive", reason=note, **fields)
            rows[name] = MemorizationRow(train_count=len(seen), unseen_count=len(unseen), note=note,
                                         status="inconclusive", value=None, interval=None)
        else:
            comparison = compare(seen, unseen, "relative", criterion, settings, seed=[settings.seed, position])
            check = Check.decided(comparison, **fields)
            rows[name] = MemorizationRow(train_count=len(seen), unseen_count=len(unseen), train_mse=float(seen.mean()),
                                         unseen_mse=float(unseen.mean()), status=check.status, value=check.value,
                                         interval=check.interval)
        checks.append(check)
    return checks, rows
