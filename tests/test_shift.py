"""Domain-shift audit: corruptions, a calibrated drift test pinned against NumPy, its power, signed one-sided
domain checks, and the planted held-out site end to end."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from pydantic import ValidationError
from threadpoolctl import threadpool_limits

from pipeline.artifacts import Layout
from pipeline.audit.corruptions import (
    CORRUPTIONS,
    SEVERITIES,
    CorruptionPairs,
    corrupt,
    corruption_check,
    corruption_pairs,
    corruption_suite,
)
from pipeline.audit.drift import IN_DISTRIBUTION, domain_auc, drift_checks, drift_power, mmd_test
from pipeline.audit.shift import domain_checks
from pipeline.audit.stats import Criterion, compare
from pipeline.contracts import Corruptions, ShiftResult
from pipeline.features import embed, linear_probe
from pipeline.mae import build
from pipeline.normalisation import Normalisation
from pipeline.params import ShiftSettings, load_params
from pipeline.render import corruption_sentence, fmt
from tests.conftest import Workspace

SETTINGS = ShiftSettings(max_domain_auc=0.75, max_relative_error_increase=0.25, max_accuracy_drop=0.10,
                         max_relative_mce=3.0, max_corruption_accuracy_drop=0.10, n_boot=200)


def textured(channels: int, seed: int = 0) -> np.ndarray:
    """Mid-grey images with texture, so no corruption saturates at severity 1."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:32, 0:32]
    wave = 0.5 + 0.2 * np.sin(x / 2.0 + y / 3.0)[None, :, :, None]
    return np.clip((wave + rng.normal(0, 0.05, (4, 32, 32, channels))) * 255, 0, 255).astype(np.uint8)


@pytest.mark.parametrize("channels", [1, 2, 3])
@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corruptions_are_deterministic_and_damage_grows_with_severity(name: str, channels: int):
    images = textured(channels)
    damage = []
    for severity in SEVERITIES:
        corrupted = corrupt(images, name, severity, seed=0)
        assert corrupted.dtype == np.uint8 and corrupted.shape == images.shape
        assert np.array_equal(corrupted, corrupt(images, name, severity, seed=0)), "same seed, same pixels"
        damage.append(float(np.mean((corrupted.astype(float) - images) ** 2)))
    assert damage[0] > 0
    assert all(later >= earlier for earlier, later in zip(damage, damage[1:])), damage
    assert damage[-1] > 1.5 * damage[0], damage


def test_drift_test_false_positive_rate_stays_near_alpha_and_it_detects_a_shift():
    alpha, trials = 0.05, 60
    p_values = []
    for seed in range(trials):
        rng = np.random.default_rng(seed)
        x, y = rng.normal(size=(60, 8)), rng.normal(size=(60, 8))
        p_values.append(mmd_test(x, y, permutations=200, seed=seed).p_value)
    p_values = np.array(p_values)
    # under the null the permutation p-value is uniform: with 60 trials at alpha 0.05 we expect 3 rejections;
    # 8 or more happens with probability below 0.5%
    assert (p_values < alpha).sum() <= 7, p_values
    assert 0.35 < p_values.mean() < 0.65 and (p_values < 0.5).mean() == pytest.approx(0.5, abs=0.2)

    rng = np.random.default_rng(99)
    shifted = mmd_test(rng.normal(size=(60, 8)), rng.normal(0.7, 1, size=(60, 8)), permutations=200, seed=0)
    assert shifted.p_value < alpha


def test_mmd_statistic_and_bandwidth_match_a_direct_numpy_computation():
    """Bandwidth: the median distance between distinct points (no self-distances); kernel exp(-d^2 / bandwidth^2);
    MMD^2 the biased V-statistic mean(Kxx) + mean(Kyy) - 2 mean(Kxy)."""
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(40, 5)), rng.normal(0.3, 1.2, size=(30, 5))
    z = np.concatenate([x, y])
    distances = np.sqrt(((z[:, None, :] - z[None, :, :]) ** 2).sum(-1))
    bandwidth = np.median(distances[~np.eye(len(z), dtype=bool)])
    kernel = np.exp(-distances ** 2 / bandwidth ** 2)
    expected = kernel[:40, :40].mean() + kernel[40:, 40:].mean() - 2 * kernel[:40, 40:].mean()
    result = mmd_test(x, y, permutations=100, seed=0)
    assert result.bandwidth == pytest.approx(bandwidth, rel=1e-12)
    assert result.mmd2 == pytest.approx(expected, rel=1e-10)
    with_self = np.median(distances)  # what the median would be with the zero self-distances in it
    assert with_self < bandwidth


def test_permutations_double_while_the_p_value_is_within_its_mc_error_of_alpha():
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(50, 4)), rng.normal(0.2, 1, size=(50, 4))
    first = mmd_test(x, y, permutations=200, seed=0)
    assert first.permutations == 200 and first.mc_error > 0
    far = mmd_test(x, y, permutations=200, seed=0, alpha=min(first.p_value + 0.5, 0.99), max_permutations=800)
    assert far.permutations == 200, "clear of alpha: no more permutations"
    near = mmd_test(x, y, permutations=200, seed=0, alpha=first.p_value, max_permutations=800)
    assert near.permutations == 800 and abs(near.p_value - first.p_value) <= near.mc_error


def test_drift_power_grows_with_the_share_of_shifted_images_mixed_in():
    rng = np.random.default_rng(5)
    reference, same, shifted = rng.normal(size=(300, 6)), rng.normal(size=(300, 6)), rng.normal(1.5, 1, (300, 6))
    settings = SETTINGS.model_copy(update={"power_shares": [0.05, 0.3, 0.6], "power_trials": 20,
                                           "power_permutations": 50})
    power = drift_power(reference, same, shifted, 80, 80, settings, seed=0)
    curve = [point.power for point in power.curve]
    assert curve[0] < 0.5 and curve[-1] == 1.0 and curve == sorted(curve), curve
    assert power.detectable_share in (0.3, 0.6) and power.n_sample == 80 and power.trials == 20
    scarce = drift_power(reference, same, shifted[:10], 80, 80, settings, seed=0)
    assert scarce.curve[-1].power is None, "more shifted images than exist are not invented"


def drift_table(sizes: dict[str, int], shifts: dict[str, float], seed: int = 0,
                dims: int = 6) -> tuple[pd.DataFrame, np.ndarray]:
    """A samples table (split, domain, record_id) and its embeddings: per split a number of images and a mean
    offset; held-out images are of domain site_x."""
    rng = np.random.default_rng(seed)
    splits = np.concatenate([[split] * n for split, n in sizes.items()])
    samples = pd.DataFrame({"record_id": [f"r{i}" for i in range(len(splits))], "split": splits,
                            "domain": np.where(splits == "heldout", "site_x", "site_a")})
    offsets = np.array([shifts.get(split, 0.0) for split in splits])[:, None]
    return samples, rng.normal(size=(len(splits), dims)) + offsets


def test_the_drift_control_is_a_null_its_false_positive_rate_over_random_splits_is_alpha():
    """Val and test are random splits of the same unseen images: the control's own decision code (drift_checks,
    the control alone when there is no training or held-out image) run on 500 random splits of one null sample
    finds drift (p < alpha) in about alpha of them (binomial standard error 0.0097 at 500 splits, so the band
    [0.03, 0.07] is about 2 of them). The same images against training images would not be a null."""
    alpha, n = 0.05, 120
    settings = SETTINGS.model_copy(update={"classifier_folds": 2})  # the AUC only grades a rejection: fewer fits
    embeddings = np.random.default_rng(0).normal(size=(n, 8))
    found, undecided = [], 0
    with threadpool_limits(1):  # products this small only lose time to BLAS threads on a busy machine
        for split in range(500):
            halves = np.where(np.random.default_rng([1, split]).permutation(n) < n // 2, "val", "test")
            samples = pd.DataFrame({"record_id": [f"r{i}" for i in range(n)], "split": halves, "domain": "site_a"})
            report, checks = drift_checks(samples, embeddings, [], settings)
            (check,) = checks
            assert check.id == "shift.drift.in_distribution" and check.reference == "val images"
            assert report["in_distribution (control)"].n_reference == n // 2
            found.append(check.p_value < alpha)
            undecided += check.status == "inconclusive" and check.p_value >= alpha
    rate = np.mean(found)
    assert 0.03 <= rate <= 0.07, rate  # docs/architecture.md records the figure
    assert undecided <= 10, "a p-value within its Monte-Carlo error of alpha is rare"


def test_drift_compares_unseen_with_unseen_and_reports_the_fit_to_training_apart():
    """The control is val against test; train against unseen is its own signal, expected to differ; a held-out
    domain is compared with unseen in-distribution images, not with training ones."""
    samples, embeddings = drift_table({"train": 200, "val": 60, "test": 60, "heldout": 60},
                                      {"train": 0.8, "heldout": 1.5})
    settings = SETTINGS.model_copy(update={"power_shares": [0.5], "power_trials": 10, "power_permutations": 20})
    report, checks = drift_checks(samples, embeddings, ["site_x"], settings)
    checks = {c.id: c for c in checks}
    assert list(checks) == ["shift.drift.in_distribution", "shift.drift.fit_to_training", "shift.drift.site_x"]
    control, fit, domain = (checks[f"shift.drift.{name}"] for name in ("in_distribution", "fit_to_training", "site_x"))
    assert control.reference == "val images" and control.status == "pass"
    assert (report["in_distribution (control)"].n_reference, report["in_distribution (control)"].n_sample) == (60, 60)
    assert control.power.curve[0].power == 1.0, "half the test images from the held-out domain: found"
    assert fit.reference == "training images" and fit.status == "fail" and "expected to differ" in fit.reason
    assert (report["fit_to_training"].n_reference, report["fit_to_training"].n_sample) == (200, 120)
    assert fit.power is None and fit.min_detectable is None
    assert domain.reference == IN_DISTRIBUTION == "in-distribution (val, test)" and domain.status == "fail"
    assert (report["site_x"].n_reference, report["site_x"].n_sample) == (120, 60)
    assert report["site_x"].reference == IN_DISTRIBUTION


def test_a_drift_subsample_is_fixed_by_the_records_not_by_a_seed_or_their_order():
    """Past max_samples each side is the first images by a keyed hash of their record ids, and the classifier's
    folds follow that order: another seed moves only the permutation p-value (within its Monte-Carlo error), and
    the rows' order moves nothing."""
    samples, embeddings = drift_table({"val": 50, "test": 50, "heldout": 40}, {"heldout": 0.3})
    settings = SETTINGS.model_copy(update={"max_samples": 30, "power_trials": 10, "power_permutations": 20})
    first, _ = drift_checks(samples, embeddings, ["site_x"], settings)
    order = np.random.default_rng(1).permutation(len(samples))
    shuffled, _ = drift_checks(samples.iloc[order].reset_index(drop=True), embeddings[order], ["site_x"], settings)
    assert shuffled == first
    reseeded, _ = drift_checks(samples, embeddings, ["site_x"], settings.model_copy(update={"seed": 7}))
    for name, result in first.items():
        other = reseeded[name]
        assert (result.n_reference, result.n_sample) == (other.n_reference, other.n_sample) == (30, 30)
        assert (result.mmd2, result.bandwidth, result.auc) == (other.mmd2, other.bandwidth, other.auc)
        assert abs(result.p_value - other.p_value) <= result.mc_error + other.mc_error


def test_domain_power_draws_its_in_distribution_images_apart_from_the_reference_side():
    """A held-out domain is tested against unseen images, so its power simulation draws both sides from that
    pool without overlap; when the pool cannot fill both at the test's sizes, the reference side is smaller and
    the point says so."""
    rng = np.random.default_rng(6)
    pool, shifted = rng.normal(size=(100, 6)), rng.normal(1.5, 1, (60, 6))
    settings = SETTINGS.model_copy(update={"power_shares": [0.2, 0.5], "power_trials": 10, "power_permutations": 20})
    roomy = drift_power(pool, None, shifted, 50, 40, settings, seed=0)
    assert all(point.note is None for point in roomy.curve) and roomy.curve[-1].power == 1.0
    tight = drift_power(pool, None, shifted, 100, 40, settings, seed=0)
    assert "68 reference images, not 100" in tight.curve[0].note and tight.curve[0].power is not None


def domain_table(error: float, accuracy: float, n: int = 400, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    unseen = pd.DataFrame({"split": "test", "domain": "site_a", "recon_mse": rng.gamma(4, 0.01 / 4, n),
                           "probe_correct": (rng.random(n) < 0.7).astype(float)})
    held = pd.DataFrame({"split": "heldout", "domain": "site_x", "recon_mse": rng.gamma(4, error / 4, n),
                         "probe_correct": (rng.random(n) < accuracy).astype(float)})
    return pd.concat([unseen, held], ignore_index=True)


def test_domain_checks_are_signed_and_one_sided():
    domains, checks = domain_checks(domain_table(0.007, 0.72), ["site_x"], SETTINGS)
    easier = {c.id: c for c in checks}
    assert easier["shift.error.site_x"].value < -0.2 and easier["shift.error.site_x"].status == "pass", \
        "a domain served better is no harm"
    assert easier["shift.accuracy.site_x"].status == "pass" and easier["shift.accuracy.site_x"].test == \
        "non-inferiority"
    assert domains.held_out["site_x"].error_comparison.value == easier["shift.error.site_x"].value
    harder = {c.id: c for c in domain_checks(domain_table(0.016, 0.45), ["site_x"], SETTINGS)[1]}
    assert harder["shift.error.site_x"].status == "fail" and harder["shift.error.site_x"].interval[0] > 0.25
    assert harder["shift.accuracy.site_x"].status == "fail" and harder["shift.accuracy.site_x"].value < -0.1
    assert harder["shift.error.site_x"].reference == "in-distribution (val, test)"
    assert {c.area for c in checks} == {"shift"}


def test_domain_classifier_auc_is_chance_on_one_distribution_and_high_on_two():
    rng = np.random.default_rng(0)
    same = domain_auc(rng.normal(size=(200, 8)), rng.normal(size=(200, 8)), folds=5)
    apart = domain_auc(rng.normal(size=(200, 8)), rng.normal(1.0, 1, size=(200, 8)), folds=5)
    assert abs(same - 0.5) < 0.1 and apart > 0.9


def test_without_labels_the_corruption_check_is_a_paired_bootstrap_of_the_reported_mean_corruption_error():
    rng = np.random.default_rng(7)
    clean = rng.gamma(4, 0.01 / 4, 200)
    corrupted = clean * rng.normal(2.5, 0.2, 200)
    check = corruption_check(CorruptionPairs(clean, corrupted), SETTINGS)
    assert check.id == "shift.corruptions" and check.area == "shift" and check.test == "non-inferiority"
    assert check.statistic.endswith("(reconstruction)")
    assert check.value == pytest.approx(corrupted.mean() / clean.mean()) and check.threshold == 3.0
    assert check.interval[0] < check.value < check.interval[1] < 3.0 and check.status == "pass"
    assert check.n_boot >= SETTINGS.n_boot and check.operating is not None
    assert corruption_check(CorruptionPairs(clean, clean * 3.6), SETTINGS).status == "fail"


def test_with_labels_the_corruption_check_is_the_probes_paired_accuracy_drop_whatever_the_reconstruction_error():
    """ImageNet-C's quantity: the classifier under corruption. A reconstruction error 20 times the clean one (what a
    brightness change does to any raw-pixel reconstructor) does not decide it; the accuracy lost does."""
    rng = np.random.default_rng(8)
    clean_error = rng.gamma(4, 0.01 / 4, 400)
    clean_correct = (rng.random(400) < 0.5).astype(float)
    small_drop = np.clip(clean_correct - rng.normal(0.02, 0.1, 400), 0, 1)  # means over 30 corrupted copies
    check = corruption_check(CorruptionPairs(clean_error, clean_error * 20, clean_correct, small_drop), SETTINGS)
    assert check.statistic.startswith("probe accuracy under corruption") and check.threshold == 0.10
    assert check.value == pytest.approx(small_drop.mean() - clean_correct.mean())
    assert check.interval[0] < check.value < check.interval[1] and -0.10 < check.interval[0]
    assert check.status == "pass" and check.test == "non-inferiority"
    big_drop = np.clip(clean_correct - rng.normal(0.3, 0.1, 400), 0, 1)
    failing = corruption_check(CorruptionPairs(clean_error, clean_error, clean_correct, big_drop), SETTINGS)
    assert failing.status == "fail" and failing.interval[1] < -0.10


def test_corruption_suite_pairs_each_images_correctness_and_without_labels_falls_back_to_reconstruction():
    """The suite's per-image pairs are what its summary reports; with a probe the accuracy decides, without one
    (a card with no label column) the reconstruction ratio does, and the summary says which, through its JSON."""
    torch.manual_seed(0)
    model = build("micro", 32, 8, 3, norm_pix_loss=False).eval()
    images = np.concatenate([textured(3, seed) for seed in range(4)])
    labels = np.arange(len(images)) % 2
    normalisation = Normalisation.fit(images)
    probe = linear_probe(embed(model, normalisation.normalise(images), "avg", 256), labels, 1.0, 1000)
    settings = SETTINGS.model_copy(update={"n_boot": 100})

    record_ids = np.array([f"r{i}" for i in range(len(images))])
    labelled, table = corruption_suite(model, images, record_ids, labels, probe, normalisation, 0.5, "avg", settings)
    assert len(table) == len(images) * (1 + len(CORRUPTIONS) * len(SEVERITIES))
    clean_rows = table[table["corruption"] == "clean"]
    assert list(clean_rows["record_id"]) == list(record_ids) and set(clean_rows["severity"]) == {0}
    assert (table.groupby("record_id")["clean_probe_pred"].nunique() == 1).all()
    assert (table["probe_correct"] == (table["probe_pred"] == table["label"])).all()
    pairs = corruption_pairs(table)
    assert labelled.decided_by == "probe_accuracy" and set(np.unique(pairs.clean_correct)) <= {0.0, 1.0}
    assert pairs.clean_correct.mean() == pytest.approx(labelled.clean.probe_accuracy)
    curves = [[point.probe_accuracy for point in curve] for curve in labelled.curves.values()]
    assert pairs.corrupted_correct.mean() == pytest.approx(np.mean(curves))
    check = corruption_check(pairs, settings)
    assert check.statistic.startswith("probe accuracy") and check.threshold == 0.10
    sentence = corruption_sentence(labelled, check)
    assert fmt(check.value, 3) in sentence and fmt(labelled.relative_mce_reconstruction, 3) in sentence
    assert "Decided on the probe" in sentence and "brightness or contrast" in sentence
    # a probe fitted on these very images makes no clean error: the error ratio is undefined, not a huge number
    assert labelled.clean.probe_accuracy == 1
    assert labelled.relative_mce_probe is None and "no clean probe error" in sentence

    unlabelled, table = corruption_suite(model, images, record_ids, None, None, normalisation, 0.5, "avg", settings)
    assert table["probe_correct"].isna().all() and table["probe_pred"].isna().all()
    pairs = corruption_pairs(table)
    assert unlabelled.decided_by == "reconstruction" and unlabelled.relative_mce_probe is None
    assert pairs.clean_correct is None and pairs.corrupted_correct is None
    assert pairs.clean_error.mean() == pytest.approx(unlabelled.clean.recon_mse)
    check = corruption_check(pairs, settings)
    assert check.statistic.endswith("(reconstruction)") and check.threshold == 3.0
    assert check.value == pytest.approx(unlabelled.relative_mce_reconstruction)
    assert "no labels" in corruption_sentence(unlabelled, check)

    for suite in (labelled, unlabelled):
        assert Corruptions.model_validate_json(suite.model_dump_json()) == suite
    with pytest.raises(ValidationError):
        Corruptions.model_validate({**unlabelled.model_dump(), "decided_by": "psnr"})


def test_audit_shift_flags_the_held_out_site_and_not_the_in_distribution_split(audited: Workspace):
    evaluated = audited
    report = ShiftResult.model_validate_json(Layout(evaluated.root).shift_file.read_text())
    checks = {c.id: c for c in report.checks}
    assert checks["shift.drift.site_east"].status == "fail", checks["shift.drift.site_east"]
    assert checks["shift.drift.in_distribution"].status == "pass", checks["shift.drift.in_distribution"]
    control = checks["shift.drift.in_distribution"]
    assert 0 <= control.p_value <= 1 and control.mc_error > 0 and control.permutations >= 200
    assert [point.share for point in control.power.curve] == [0.05, 0.1, 0.2, 0.3, 0.5]
    assert control.min_detectable.value == control.power.detectable_share
    assert checks["shift.drift.site_east"].p_value is not None and checks["shift.drift.site_east"].power is None
    for name in ("shift.error.site_east", "shift.accuracy.site_east", "shift.corruptions"):
        for field in ("reference", "confidence", "adjustment", "mc_error", "n_boot", "operating", "interval"):
            assert getattr(checks[name], field) is not None, (name, field)
    assert control.reference == "val images" and checks["shift.drift.site_east"].reference == IN_DISTRIBUTION
    fit = checks["shift.drift.fit_to_training"]
    assert fit.reference == "training images" and "expected to differ" in fit.reason
    assert report.drift["site_east"].auc > report.drift["in_distribution (control)"].auc
    curves = report.corruptions.curves
    assert set(curves) == set(CORRUPTIONS) and all(len(curve) == 5 for curve in curves.values())
    corruption = checks["shift.corruptions"]
    suite = report.corruptions
    assert suite.decided_by == "probe_accuracy" and corruption.statistic.startswith("probe accuracy")
    accuracy = np.mean([[point.probe_accuracy for point in curve] for curve in curves.values()])
    assert corruption.value == pytest.approx(accuracy - suite.clean.probe_accuracy, abs=1e-9)
    assert report.domains.worst_domain == "site_east"
    shift_md = (Layout(evaluated.root).shift / "shift.md").read_text()
    assert f"interval {fmt(corruption.interval, 3)}" in shift_md, "the corruption result is stated with its interval"
    assert "corruptions.parquet" in shift_md
    for name in ("shift.md", "corruption_curves.png", "overtrust.png", "corruptions.parquet"):
        assert (Layout(evaluated.root).shift / name).is_file()


def test_the_corruption_check_recomputes_from_the_per_image_parquet_beside_shift_json(audited: Workspace):
    """A reviewer's recomputation: each image's clean row paired with the mean of its 30 corrupted rows, the same
    paired bootstrap, gives shift.json's value and interval."""
    folder = Layout(audited.root).shift
    report = ShiftResult.model_validate_json((folder / "shift.json").read_text())
    check = next(c for c in report.checks if c.id == "shift.corruptions")
    table = pd.read_parquet(folder / "corruptions.parquet")
    assert len(table) == report.corruptions.images * (1 + len(CORRUPTIONS) * len(SEVERITIES))
    assert set(table.loc[table["corruption"] == "clean", "severity"]) == {0}
    assert table["probe_correct"].isin([0, 1]).all()
    clean = table[table["corruption"] == "clean"].set_index("record_id")
    assert (clean["probe_correct"] == (clean["probe_pred"] == clean["label"])).all()
    corrupted = table[table["corruption"] != "clean"].pivot(index="record_id", columns=["corruption", "severity"],
                                                            values="probe_correct").loc[clean.index]
    assert corrupted.shape[1] == 30 and not corrupted.isna().any().any()
    assert clean["probe_correct"].mean() == pytest.approx(report.corruptions.clean.probe_accuracy, abs=1e-12)
    settings = load_params(audited.root / "params.yaml").audit_shift
    recomputed = compare(clean["probe_correct"].to_numpy(), corrupted.mean(axis=1).to_numpy(), "difference",
                         Criterion(settings.max_corruption_accuracy_drop, "lower", equivalence=False), settings,
                         seed=settings.seed, paired=True)
    assert recomputed.value == pytest.approx(check.value, abs=1e-12)
    assert recomputed.interval == pytest.approx(check.interval, abs=1e-9) and recomputed.status == check.status
