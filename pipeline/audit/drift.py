"""Embedding drift: an MMD two-sample test, a domain classifier's AUC, and what the test could have found.

The MMD test uses an RBF kernel and a permutation p-value (calibrated by construction: under the null every
permutation is equally likely); the AUC of a cross-validated domain classifier is the effect size. Three kinds of
test, chosen so that the control is a null:
- the control (`shift.drift.in_distribution`): test against val images, both unseen random splits of the same
  domains, so it rejects in about alpha of splits (measured in tests/test_shift.py and docs/architecture.md);
- fit to training (`shift.drift.fit_to_training`): unseen in-distribution (val, test) against training
  images. Not a null, since the model was fit to the training images: reported as that signal, expected to
  differ, never as the control;
- each held-out domain against unseen in-distribution images (val, test), not against training images:
  with train not a null, a domain tested against it would mix the fit to training into the shift; against
  unseen images only the domain differs, the same reference its error and accuracy checks use.
No decision depends on the seed of a subsample: each side is every image, or past `max_samples` (which
bounds the cost at scale) the first by a keyed hash of the record ids, a fixed function of the data; the
classifier's folds follow the same order. The one seed left, the permutations', is covered by the Monte-Carlo
safeguard: permutations double while the p-value lies within its Monte-Carlo error of alpha. A control or
domain test that finds nothing states its power: held-out-domain embeddings mixed into in-distribution ones
at several shares, the same test simulated on them at the same sample sizes, and the smallest share detected
with the target power (a simulation, reported, deciding nothing).
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from pipeline.artifacts import SHIFT, UNSEEN
from pipeline.audit.stats import p_value_mc_error
from pipeline.contracts import Check, Drift, MinDetectable, PermutationTest, Power, PowerPoint
from pipeline.params import ShiftSettings


def mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int | np.random.Generator,
             alpha: float | None = None, max_permutations: int | None = None) -> PermutationTest:
    """Squared MMD (biased V-statistic) with the RBF kernel exp(-d² / bandwidth²), the bandwidth being the median
    distance between distinct points of the pooled sample, and its permutation p-value
    (1 + #{permuted >= observed}) / (1 + permutations). Given `alpha`, the permutations double (up to
    `max_permutations`) while the p-value lies within its Monte-Carlo error of alpha."""
    from scipy.spatial.distance import pdist, squareform

    distances = pdist(np.concatenate([x, y]).astype(np.float64))  # i < j only: no self-distances
    bandwidth = float(np.median(distances)) if distances.size else 0.0
    bandwidth = bandwidth if bandwidth > 0 else 1.0
    kernel = np.exp(-squareform(distances ** 2) / bandwidth ** 2)
    n, m = len(x), len(y)
    signs = np.r_[np.full(n, 1.0 / n), np.full(m, -1.0 / m)]  # +1/n for x, -1/m for y
    observed = float(signs @ kernel @ signs)
    rng = np.random.default_rng(seed)
    exceeded, done, batch = 0, 0, permutations
    while True:
        for start in range(0, batch, 1000):  # bounds the memory of one matrix product
            permuted = rng.permuted(np.tile(signs, (min(1000, batch - start), 1)), axis=1)
            exceeded += int((np.einsum("ij,ij->i", permuted @ kernel, permuted) >= observed - 1e-12).sum())
        done += batch
        p_value = (1 + exceeded) / (1 + done)
        error = p_value_mc_error(p_value, done)
        if alpha is None or abs(p_value - alpha) > error or done >= (max_permutations or 0):
            break
        batch = min(done, max_permutations - done)
    return PermutationTest(mmd2=observed, p_value=p_value, mc_error=error, permutations=done, bandwidth=bandwidth,
                           n_reference=n, n_sample=m)


def domain_auc(x: np.ndarray, y: np.ndarray, folds: int) -> float:
    """Cross-validated ROC AUC of a classifier telling `y` from `x`: 0.5 when indistinguishable. The folds are
    contiguous runs of each side's rows, unshuffled: callers pass rows in keyed order (`keyed_rows`), so the
    folds, like the rows, are a fixed function of the data and no seed can move the AUC. Fitted on one thread, as
    the probe is (pipeline.features.OneThread): lbfgs's threaded products change with the thread count."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    features = np.concatenate([x, y])
    target = np.r_[np.zeros(len(x)), np.ones(len(y))]
    folds = max(2, min(folds, len(x), len(y)))
    with threadpool_limits(limits=1):
        scores = cross_val_predict(make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)), features,
                                   target, cv=StratifiedKFold(folds), method="predict_proba")
    return float(roc_auc_score(target, scores[:, 1]))


def record_keys(record_ids) -> np.ndarray:
    """A keyed hash of each record id (64 bits): a pseudo-random order that is a fixed function of the records."""
    return np.array([int.from_bytes(hashlib.blake2b(str(r).encode(), digest_size=8, person=b"shift.drift").digest(),
                                    "big") for r in record_ids], dtype=np.uint64)


def keyed_rows(rows: np.ndarray, keys: np.ndarray, limit: int | None) -> np.ndarray:
    """The indices of the rows selected by the mask `rows`, in keyed order, the first `limit` of them: every row
    when there are at most `limit` (or `limit` is None), else a subsample fixed by the records themselves, whatever
    the seed."""
    index = np.flatnonzero(rows)
    return index[np.argsort(keys[index], kind="stable")][:limit]


def subsample(values: np.ndarray, limit: int, rng: np.random.Generator) -> np.ndarray:
    return values if len(values) <= limit else values[np.sort(rng.choice(len(values), limit, replace=False))]


def drift(x: np.ndarray, y: np.ndarray, reference: str, settings: ShiftSettings, seed: int) -> Drift:
    """The drift decision on `y` against `x` (rows in keyed order, at most settings.max_samples each): pass when
    the MMD test finds nothing; fail when it finds drift the domain classifier tells apart with an AUC of at least
    settings.max_domain_auc; inconclusive for a smaller drift, or a p-value within its Monte-Carlo error of alpha.
    The only seed is the permutations', whose Monte-Carlo error decides nothing (see `mmd_test`)."""
    test = mmd_test(x, y, settings.permutations, seed, settings.alpha, settings.max_permutations)
    auc = domain_auc(x, y, settings.classifier_folds)
    reason = None
    if abs(test.p_value - settings.alpha) <= test.mc_error:
        status = "inconclusive"
        reason = (f"the p-value {test.p_value:.4f} lies within its Monte-Carlo error (±{test.mc_error:.4f}) of alpha "
                  f"{settings.alpha} after {test.permutations} permutations: the permutation seed, not the data, "
                  "would decide")
    elif test.p_value >= settings.alpha:
        status = "pass"
    elif auc >= settings.max_domain_auc:
        status = "fail"
    else:
        status = "inconclusive"
        reason = (f"significant drift (p {test.p_value:.4f}) with a domain-classifier AUC of {auc:.3f}, below "
                  f"{settings.max_domain_auc}: a small shift")
    return Drift(**dict(test), reference=reference, auc=auc, status=status, reason=reason)


def drift_power(reference: np.ndarray, in_distribution: np.ndarray | None, shifted: np.ndarray, n: int, m: int,
                settings: ShiftSettings, seed: int) -> Power:
    """What a drift test of `n` reference against `m` other images could have found: the share of `shifted`
    (held-out-domain) embeddings mixed into in-distribution ones that the same test detects at settings.alpha,
    in settings.power_trials simulations per share (with settings.power_permutations permutations each, fewer
    than the test's own, to stay cheap; a coarser p-value only makes the estimate conservative). With
    `in_distribution` None the in-distribution images come from the `reference` pool, disjoint from the
    reference side; where the pool cannot fill both at these sizes, the reference side takes what is left and the
    point says so (fewer images: a lower bound on the power)."""
    rng = np.random.default_rng(seed)
    curve = []
    for share in settings.power_shares:
        k = int(round(share * m))
        shared = in_distribution is None
        side = min(n, len(reference) - (m - k)) if shared else n
        if k > len(shifted) or side < 2 or (not shared and m - k > len(in_distribution)):
            curve.append(PowerPoint(share=share, power=None, note="not enough images to mix at this share"))
            continue
        detected = 0
        for _ in range(settings.power_trials):
            if shared:
                order = rng.permutation(len(reference))
                x, fill = reference[order[:side]], reference[order[side:side + m - k]]
            else:
                x, fill = subsample(reference, n, rng), subsample(in_distribution, m - k, rng)
            y = np.concatenate([fill, subsample(shifted, k, rng)])
            detected += mmd_test(x, y, settings.power_permutations, rng).p_value < settings.alpha
        note = None if side == n else (f"{side} reference images, not {n}: the pool also fills the in-distribution "
                                       "side; a lower bound on the power")
        curve.append(PowerPoint(share=share, power=detected / settings.power_trials, note=note))
    reached = [point.share for point in curve if point.power is not None and point.power >= settings.power]
    return Power(curve=curve, detectable_share=min(reached, default=None), target=settings.power,
                 trials=settings.power_trials, permutations=settings.power_permutations, n_reference=n, n_sample=m)


# ---------------------------------------------------------------- the checks

IN_DISTRIBUTION = "in-distribution (val, test)"
FIT_TO_TRAINING = ("expected to differ: the model was fit to the training images, so their embeddings are not a "
                   "sample of what unseen images give; a signal of fit, not a shift in the data and not a control")


def drift_checks(samples: pd.DataFrame, embeddings: np.ndarray, held_out: list[str],
                 settings: ShiftSettings) -> tuple[dict[str, Drift], list[Check]]:
    """The control (test images against val images: both unseen random splits of the same domains, a null), the
    fit to training (unseen in-distribution against training images, reported, expected to differ) and each
    held-out domain against unseen in-distribution images. Each side is every image, or past settings.max_samples
    a subsample fixed by a keyed hash of the record ids. A control or domain test that found nothing also reports
    its power against held-out images mixed into in-distribution ones."""
    split = samples["split"].to_numpy()
    val, test, train = split == "val", split == "test", split == "train"
    unseen = np.isin(split, UNSEEN)
    heldout = split == "heldout"
    keys = record_keys(samples["record_id"])
    # name -> (reference rows, the reference in words, tested rows, power: (in-distribution pool, None for the
    # reference's own; held-out images mixed in), or None where no power is simulated)
    tests = {"in_distribution (control)": (val, "val images", test,
                                           (test, heldout & samples["domain"].isin(held_out).to_numpy())),
             "fit_to_training": (train, "training images", unseen, None)}
    for domain in held_out:
        rows = heldout & (samples["domain"] == domain).to_numpy()
        tests[domain] = (unseen, IN_DISTRIBUTION, rows, (None, rows))
    report, checks = {}, []
    for offset, (name, (reference_rows, reference, rows, power)) in enumerate(tests.items()):
        if reference_rows.sum() < 2 or rows.sum() < 2:
            continue
        x = embeddings[keyed_rows(reference_rows, keys, settings.max_samples)]
        y = embeddings[keyed_rows(rows, keys, settings.max_samples)]
        result = drift(x, y, reference, settings, settings.seed + offset)
        reason, minimum = result.reason, None
        if power is None:
            reason = "; ".join(filter(None, [reason, FIT_TO_TRAINING]))
        elif result.p_value >= settings.alpha:
            pool, source = power
            if source.sum() >= 2:
                every = [None if mask is None else embeddings[keyed_rows(mask, keys, None)]
                         for mask in (reference_rows, pool, source)]  # keyed order: the rows' order moves nothing
                result.power = drift_power(*every, result.n_reference, result.n_sample, settings,
                                           settings.seed + offset)
                minimum = MinDetectable(
                    value=result.power.detectable_share,
                    definition=f"smallest share of held-out-domain images among {result.n_sample} in-distribution "
                               f"ones that this test detects (p < {settings.alpha}) with {settings.power:.0%} power "
                               f"against {result.n_reference} {reference} (simulated, {settings.power_trials} "
                               "trials per share)")
            else:
                reason = reason or "no held-out-domain images to simulate a shift with: the test's power is unknown"
        result.reason = reason
        report[name] = result
        checks.append(Check(id=f"shift.drift.{name.split(' ')[0]}", area="shift", status=result.status,
                            statistic="MMD permutation p-value / domain-classifier AUC", value=result.auc,
                            p_value=result.p_value, mc_error=result.mc_error, permutations=result.permutations,
                            threshold=settings.max_domain_auc, alpha=settings.alpha, reference=reference,
                            power=result.power, min_detectable=minimum, reason=reason,
                            detail=f"{SHIFT}/shift.md#embedding-drift"))
    return report, checks
