"""Model quality: does the model beat trivial baselines on images it never saw? A model that does not has learnt
nothing worth releasing, however well it does in the other audits (a 3-epoch model whose probe lost to a randomly
initialised encoder was approved, issue 27). Pure: evaluate's per-sample table in, checks out; the report judges
them first.

On the unseen splits (val, test), each paired image by image (`compare(..., paired=True)`) and one-sided against
`report.min_margin_over_baselines` (0 by default: a superiority test, passed only when the whole interval shows the
model ahead, failed when it shows the model behind):

- `model.reconstruction.patch_mean`: the model's hidden-pixel error / that of predicting each hidden patch's own
  mean, on the same images and masks, - 1 (relative, higher is worse);
- where there are labels, `model.probe.<baseline>` and `model.knn.<baseline>` for the baselines random_init (the
  same architecture, untrained) and raw_pixels: per-image correctness of the MAE's classifier minus the baseline's
  (difference, lower is worse). Raw-pixel features exist only for a seeded sample of each split
  (`evaluate.raw_pixels_images`), so those checks pair that sample's images alone; the others are left out.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.artifacts import GOVERNANCE, UNSEEN
from pipeline.audit.stats import Criterion, compare
from pipeline.contracts import Check
from pipeline.params import ReportSettings

DETAIL = f"{GOVERNANCE}/report.md#model-quality"
BASELINES = {"random_init": "random-init", "raw_pixels": "raw-pixel"}
METHODS = {"probe": "linear probe", "knn": "kNN"}
SEED_STREAM = 1  # bootstrap seeds [seed, SEED_STREAM, position]: apart from memorization's [seed, position]


def quality_checks(samples: pd.DataFrame, settings: ReportSettings) -> list[Check]:
    """The reconstruction check, then probe and kNN against each baseline (not_applicable without labels)."""
    unseen = samples[samples["split"].isin(UNSEEN)]
    margins = settings.min_margin_over_baselines
    checks = [paired_check(
        unseen["recon_mse"], unseen["recon_mse_patch_mean"], "relative", "higher", margins.reconstruction, settings,
        position=0, id="model.reconstruction.patch_mean",
        statistic="model / per-patch-mean predictor hidden-pixel error - 1 (same images and masks)",
        reference="predicting each hidden patch's own mean, on the same {n} unseen images and masks")]
    labelled = bool(unseen["probe_correct"].notna().any())
    for position, (method, baseline) in enumerate(((m, b) for m in METHODS for b in BASELINES), start=1):
        sampled = baseline == "raw_pixels"
        fields = dict(id=f"model.{method}.{baseline}",
                      statistic=f"MAE - {BASELINES[baseline]} {METHODS[method]} accuracy (same images"
                                + ("; the raw-pixel baseline's sample only)" if sampled else ")"))
        if not labelled:
            checks.append(Check(area="model", status="not_applicable", threshold=0.0 - getattr(margins, method),
                                detail=DETAIL, reason="the evaluated data has no labels: no probe or kNN to compare",
                                **fields))
            continue
        checks.append(paired_check(
            unseen[f"{method}_correct"], unseen[f"{method}_correct_{baseline}"], "difference", "lower",
            getattr(margins, method), settings, position,
            reference=f"the {BASELINES[baseline]} features' {METHODS[method]} on the same {{n}} unseen images"
                      + (" (raw-pixel features exist only for a seeded sample of each split, "
                         "evaluate.raw_pixels_images: the other images have no raw-pixel prediction and are left "
                         "out of the pairs)" if sampled else ""), **fields))
    return checks


def paired_check(model: pd.Series, baseline: pd.Series, measure: str, harmful: str, margin: float,
                 settings: ReportSettings, position: int, reference: str, **fields) -> Check:
    """The model's per-image values against the baseline's on the same images, pairs with a null dropped, by
    `compare`'s statistic `measure`; `reference` names the baseline, with {n} for the number of pairs. The
    threshold, on the harmful side, is -margin: 0 by default, a superiority test."""
    criterion = Criterion(0.0 - margin, harmful, equivalence=False)  # 0.0 - 0.0 is 0.0, which reads 0, not -0
    model, baseline = model.to_numpy(dtype=np.float64), baseline.to_numpy(dtype=np.float64)
    pairs = int((~(np.isnan(model) | np.isnan(baseline))).sum())
    fields.update(area="model", threshold=criterion.threshold, detail=DETAIL,
                  reference=reference.format(n=f"{pairs:,}"))
    if pairs < 2:  # a bootstrap needs two pairs
        return Check(status="inconclusive", test=criterion.test, harmful=harmful,
                     reason=f"{pairs} unseen images have both measurements: too few to compare", **fields)
    comparison = compare(baseline, model, measure, criterion, settings, seed=[settings.seed, SEED_STREAM, position],
                         paired=True)
    return Check.decided(comparison, **fields)
