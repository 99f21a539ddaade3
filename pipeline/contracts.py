"""What one stage hands another, typed once: the JSON files between stages are these models serialised.

A writer builds the model and `artifacts.write_json` writes `model_dump(mode="json")`; a reader gets it back from
`artifacts.read_json(path, Model)` (`model_validate_json`), so a field renamed on one side is an error at once,
naming the file and the field, never a KeyError three stages later. Follow a record from card to release.json:

- ingest writes `Provenance` (how many records were read, accepted and quarantined, and why);
- validate writes `ValidationSummary`; pretrain writes `ModelConfig`, `RunRecord` and `PretrainMetrics`;
- evaluate writes `EvalMetrics` (and the per-sample table the audits read);
- every decided question is a `Check`: the audits (`BiasResult`, `ShiftResult`) and the report's own judges
  (model quality, validation, consent, memorization) all construct the same model, and the report reads
  attributes, not keys;
- the report writes `Release`: the decision, the model it is about, and every field of every check.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

Status = Literal["pass", "inconclusive", "fail"]
# a check that has nothing to judge (no approved model to compare with): shown, never blocking
CheckStatus = Literal["pass", "inconclusive", "fail", "not_applicable"]
# "model" first: a model that does not beat trivial baselines is the first thing a reviewer reads
Area = Literal["model", "validation", "consent", "bias", "shift", "memorization", "regression"]
AREAS: tuple[Area, ...] = ("model", "validation", "consent", "bias", "shift", "memorization", "regression")
Interval = tuple[float, float]
# what the gate proposes: a person disposes (pipeline.review); `approved` is a sign-off's outcome, never the gate's
Decision = Literal["eligible", "blocked"]


class Contract(BaseModel):
    """Unknown fields are refused (a misspelt writer is caught by its reader); NaN, which a bootstrap of an
    undefined statistic produces, survives the round trip."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")


# ---------------------------------------------------------------- the statistics of a decided check

class Adjustment(Contract):
    """The multiple-comparison adjustment behind a check's confidence."""

    method: str
    comparisons: int
    family_confidence: float


class MinDetectable(Contract):
    """The smallest true difference (or, for a drift test, share of shifted images) the check could have found."""

    value: float | None
    definition: str


class OperatingPoint(Contract):
    """The decision's chance of each outcome if the statistic's true value were `value`."""

    label: str  # "no gap", "tolerance", "twice the tolerance" or "observed"
    value: float
    p_pass: float
    p_fail: float


class Needed(Contract):
    """Images on each side (for a paired check: pairs) that would give the named outcome its target probability."""

    sample: int
    reference: int


class Operating(Contract):
    """What a decided check catches at its sizes (`audit.stats.operating`): P(pass) and P(fail) at no gap, at the
    tolerance and at twice it, and the sizes for an 80% pass at no gap and an 80% fail at twice the tolerance."""

    points: list[OperatingPoint]
    standard_error: float
    n_reference: int
    n_sample: int
    paired: bool
    for_pass: Needed | None
    for_fail: Needed | None
    method: str


class PowerPoint(Contract):
    share: float
    power: float | None
    note: str | None = None


class Power(Contract):
    """What a drift test that found nothing could have found: its simulated power per mixed-in share."""

    curve: list[PowerPoint]
    detectable_share: float | None
    target: float
    trials: int
    permutations: int
    n_reference: int
    n_sample: int


class Comparison(Contract):
    """A signed statistic against a reference, decided on its bootstrap interval (`audit.stats.compare`)."""

    status: Status
    value: float
    interval: Interval
    confidence: float
    adjustment: Adjustment
    mc_error: Interval
    n_boot: int
    interval_method: Literal["BCa", "percentile"]
    test: Literal["equivalence", "non-inferiority"]
    harmful: Literal["higher", "lower"]
    operating: Operating
    reason: str | None = None


class Check(Contract):
    """One governance question answered pass, fail or inconclusive, with the evidence that decided it. Every
    area builds this model; release.json carries every field of it (null where a field does not apply)."""

    id: str
    area: Area
    status: CheckStatus
    statistic: str
    value: float | int | str | None = None
    interval: Interval | None = None
    threshold: float | int | str | None = None
    detail: str
    reason: str | None = None
    blocking: bool | None = None  # set by the release decision
    # a comparison against a reference (stats.compare)
    reference: str | None = None
    test: Literal["equivalence", "non-inferiority"] | None = None
    harmful: Literal["higher", "lower"] | None = None
    confidence: float | None = None
    adjustment: Adjustment | None = None
    mc_error: Interval | float | None = None  # a bound's pair, or a p-value's
    n_boot: int | None = None
    interval_method: Literal["BCa", "percentile"] | None = None
    operating: Operating | None = None  # what the decision catches at these sizes
    min_detectable: MinDetectable | None = None  # a drift test's detectable share
    # a permutation test
    p_value: float | None = None
    permutations: int | None = None
    alpha: float | None = None
    power: Power | None = None
    # where a bias check belongs
    grouping: str | None = None
    group: str | None = None
    metric: str | None = None
    # the counts behind a validation or consent check
    warnings: int | None = None
    reasons: dict[str, int] | None = None
    training_records: int | None = None

    @classmethod
    def decided(cls, comparison: Comparison, **fields) -> Check:
        """A check decided by a comparison: its status, value, interval and statistics are the comparison's."""
        return cls(**{**dict(comparison), **fields})


# ---------------------------------------------------------------- ingest, validate, pretrain

class Counts(Contract):
    read: int
    accepted: int
    quarantined: int
    by_reason: dict[str, int]


class CardRef(Contract):
    path: str
    sha256: str
    version: str


class SourceRef(Contract):
    kind: str
    settings: dict
    sha256: str


class WithdrawalsRef(Contract):
    path: str
    entries: int


class Provenance(Contract):
    """data/ingested/<dataset>/provenance.json: where the records came from and what became of each."""

    dataset: str
    card: CardRef
    source: SourceRef
    policy: dict
    withdrawals: WithdrawalsRef
    code: dict
    pixels: dict
    counts: Counts
    reasons: dict[str, str]


class ExpectationOutcome(Contract):
    asset: str
    check: str | None
    expectation: str
    column: str | None
    severity: str
    success: bool
    unexpected_count: int | None
    element_count: int | None
    observed_value: object = None
    examples: list
    exception: str | None


class DatasetValidation(Contract):
    evaluated: int
    failed: int
    failed_critical: int
    failed_warning: int
    checks: list[ExpectationOutcome]


class ValidationSummary(Contract):
    """reports/validation/summary.json."""

    passed: bool
    failed_critical: int
    failed_warning: int
    datasets: dict[str, DatasetValidation]


class NormalisationStats(Contract):
    mean: list[float]
    std: list[float]


class TrainedOn(Contract):
    """One dataset whose train split trained the model (pretrain.datasets), as it was when it did."""

    name: str
    weight: float
    train_images: int  # rows of its train split
    samples_per_epoch: int  # its share of each epoch's samples, from its weight
    train_md5: str  # DVC's md5 of its train split's pixels


class ModelConfig(Contract):
    """models/mae/config.json: how to rebuild the trained model and feed it."""

    model: dict[str, int | float | bool | str]  # MaskedAutoencoderViT's constructor arguments
    preset: str
    mask_ratio: float
    pool: str  # the feature the logged encoder returns (evaluate.pool)
    normalisation: NormalisationStats
    dataset: str  # the one evaluate and the audits judge: the first of `datasets`
    datasets: list[TrainedOn]  # every dataset the model trained on, in the order pretrain.datasets lists them
    run_id: str | None


class RunRecord(Contract):
    """models/mae/run.json: the MLflow run that trained the model and its logged encoder."""

    run_id: str
    experiment_id: str | None = None
    model_uri: str | None = None
    tracking_uri: str | None = None


class PretrainMetrics(Contract):
    """metrics/pretrain.json (DVC metrics)."""

    val_masked_loss: float
    val_patch_mean_baseline: float
    improvement_over_baseline: float
    final_train_loss: float
    epochs: int
    steps: int


# ---------------------------------------------------------------- evaluate

class ReconstructionScores(Contract):
    count: int
    mse: float
    psnr: float
    masked_loss: float
    mse_random_init: float
    mse_patch_mean: float


class ClassifierScores(Contract):
    """Top-1 accuracy of one classifier (probe or kNN) per evaluated split and feature kind."""

    available: bool
    reason: str | None = None  # why not, when unavailable
    val: dict[str, float] | None = None  # feature kind (mae, random_init, raw_pixels) -> accuracy
    test: dict[str, float] | None = None
    heldout: dict[str, float] | None = None
    margin_over_random_init: float | None = None  # on test
    margin_over_raw_pixels: float | None = None
    k: int | None = None  # kNN only

    def splits(self) -> dict[str, dict[str, float]]:
        return {name: scores for name in ("val", "test", "heldout") if (scores := getattr(self, name)) is not None}


class RawPixelSample(Contract):
    """What the raw-pixel baseline saw: a seeded sample of at most `max_images` per split, each image area-averaged
    to `size` pixels a side, so its memory does not grow with the collection."""

    max_images: int
    size: int
    images: dict[str, int]  # split -> images in its sample


class EvalMetrics(Contract):
    """metrics/eval.json (DVC metrics)."""

    dataset: str
    mask_ratio: float
    seed: int
    pool: str
    reconstruction: dict[str, ReconstructionScores]
    probe: ClassifierScores
    knn: ClassifierScores
    raw_pixels: RawPixelSample | None = None  # None: written before the baseline was sampled


# ---------------------------------------------------------------- the bias audit

class GroupValue(Contract):
    count: int
    status: Literal["ok", "insufficient data"]
    value: float | None = None
    interval: Interval | None = None
    vs_reference: float | None = None
    vs_reference_interval: Interval | None = None
    decision: Status | None = None


class MetricComparison(Contract):
    """One metric of one grouping: each group's value, and each against the reference group."""

    statistic: str
    threshold: float
    test: str
    harmful: str
    groups: dict[str, GroupValue]
    overall: float | None = None
    overall_interval: Interval | None = None
    reference: str | None = None
    reference_reason: str | None = None
    comparisons: int = 0
    reference_value: float | None = None


class GroupingReport(Contract):
    grouping: list[str]
    counts: dict[str, int]
    insufficient_data: list[str]
    metrics: dict[str, MetricComparison]


class RepresentationGroup(Contract):
    train_count: int
    train_share: float
    population_share: float | None
    ratio: float | None


class Representation(Contract):
    groups: dict[str, RepresentationGroup]
    under_represented: list[str]


class BiasThresholds(Contract):
    max_relative_error_gap: float
    max_accuracy_gap: float
    min_representation_ratio: float


class BiasResult(Contract):
    """reports/bias/bias.json."""

    dataset: str
    splits: list[str]
    evaluated: int
    confidence: float
    adjustment: str
    n_boot: int
    max_n_boot: int
    power: float
    reference_groups: dict[str, str]
    min_group_size: int
    thresholds: BiasThresholds
    skipped_metrics: dict[str, str]
    note: str | None = None
    groupings: dict[str, GroupingReport]
    representation: dict[str, Representation]
    checks: list[Check]
    status: Status


# ---------------------------------------------------------------- the domain-shift audit

class Estimate(Contract):
    value: float
    interval: Interval


class InDistribution(Contract):
    count: int
    recon_mse: float
    probe_accuracy: float | None


class HeldOutDomain(Contract):
    count: int
    recon_mse: float | None = None
    probe_accuracy: float | None = None
    error_comparison: Estimate | None = None
    accuracy_comparison: Estimate | None = None


class ShiftDomains(Contract):
    in_distribution: InDistribution
    held_out: dict[str, HeldOutDomain]
    worst_domain: str | None = None


class PermutationTest(Contract):
    """An MMD two-sample test with its permutation p-value."""

    mmd2: float
    p_value: float
    mc_error: float
    permutations: int
    bandwidth: float
    n_reference: int
    n_sample: int


class Drift(PermutationTest):
    reference: str | None = None  # what the images were tested against (the test's first side)
    auc: float
    status: Status
    reason: str | None = None
    power: Power | None = None


class CorruptionPoint(Contract):
    recon_mse: float
    probe_accuracy: float | None = None


class Corruptions(Contract):
    images: int
    clean: CorruptionPoint
    curves: dict[str, list[CorruptionPoint]]
    relative_mce_reconstruction: float
    relative_mce_probe: float | None = None
    # what decided shift.corruptions: the probe's accuracy drop where the data has labels, else the reconstruction
    decided_by: Literal["probe_accuracy", "reconstruction"] = "reconstruction"


class ShiftResult(Contract):
    """reports/shift/shift.json."""

    dataset: str
    held_out_domains: list[str]
    alpha: float
    confidence: float
    adjustment: str
    n_boot: int
    max_n_boot: int
    permutations: int
    max_permutations: int
    power: float
    note: str | None = None
    domains: ShiftDomains
    drift: dict[str, Drift]
    corruptions: Corruptions
    checks: list[Check]
    status: Status


# ---------------------------------------------------------------- the report

class AreaStatus(Contract):
    status: CheckStatus
    advisory: CheckStatus | None


class ReleasePolicy(Contract):
    block_on: dict[str, list[str]]  # status -> the check-id patterns it blocks
    advisory: list[str]


class ReleaseDecision(Contract):
    """The automated outcome over a set of checks (report.judge.decide_release): eligible for a sign-off, or
    blocked until waivers cover every blocking check."""

    decision: Decision
    blocked_by: list[str]
    areas: dict[str, AreaStatus]
    policy: ReleasePolicy
    checks: list[Check]


class ModelFacts(Contract):
    dataset: str  # evaluated and audited
    trained_on: list[TrainedOn] = []  # every dataset the model trained on (empty in a release written before)
    run_id: str
    experiment_id: str | None
    model_uri: str
    registered_model: str
    version: str
    git_commit: str
    git_dirty: str
    git_changed_paths: str
    preset: str
    mask_ratio: float
    pool: str
    architecture: dict[str, int | float | bool | str]
    # the logged model's files (all but its governance/ copy of the report) -> SHA-256, recorded at registration
    # (and as the version's tag model.files_sha256): what `registry.load_encoder` checks before it loads
    files: dict[str, str] = {}


class ReportPaths(Contract):
    html: str
    markdown: str
    model_card: str


class WithdrawnVersion(Contract):
    """Another registered version trained on records the withdrawals file now lists (what consent-check finds);
    the report tags it consent.status = withdrawn_records."""

    version: str
    run_id: str
    records: list[str]  # `<dataset>/<record id>` of the withdrawn records it trained on


class Release(Contract):
    """reports/governance/release.json: what the release gate and the registry read. `review` is the sign-off
    block: rewritten in place by each sign-off, so it is left out of the digest a sign-off takes of this file."""

    decision: Decision
    blocked_by: list[str]
    areas: dict[str, AreaStatus]
    policy: ReleasePolicy
    model: ModelFacts
    data_hashes: dict[str, str]
    report: ReportPaths
    checks: list[Check]
    review: Review | None = None  # None: written before sign-off existed
    changes: Changes | None = None  # since the approved version; None: none was approved
    withdrawn_versions: list[WithdrawnVersion] = []  # other versions trained on withdrawn records


class MemorizationRow(Contract):
    """One row of the report's memorization table (overall, or one group)."""

    train_count: int
    unseen_count: int
    train_mse: float | None = None
    unseen_mse: float | None = None
    note: str | None = None
    status: Status
    value: float | None
    interval: Interval | None


# ---------------------------------------------------------------- human sign-off (pipeline.review)

SignoffDecision = Literal["approve", "reject", "waive"]
ReviewState = Literal["awaiting sign-off", "approved", "rejected", "not required"]


class Waiver(Contract):
    """A reviewer's written acceptance of a fail or inconclusive check, bound to the evidence it was granted on:
    a later report whose evidence for the check is worse, or the day after `expires`, voids it."""

    check: str
    reason: str
    expires: str  # ISO date, the last day the waiver holds
    status: CheckStatus  # the check's evidence when the waiver was granted
    value: float | int | str | None = None
    interval: Interval | None = None
    harmful: Literal["higher", "lower"] | None = None


class SignoffPredicate(Contract):
    """What a reviewer states: the predicate of the signed in-toto Statement (the subjects carry the digests)."""

    reviewer: str
    time: str  # UTC, ISO 8601
    decision: SignoffDecision
    comment: str
    waivers: list[Waiver]
    registered_model: str
    version: str
    run_id: str


class SignoffView(Contract):
    """One sign-off as the report, release.json and `review show` state it: what was signed, the digest of the
    signed envelope (as the MLflow version tag), and why it does not hold, if it does not."""

    reviewer: str
    time: str
    decision: SignoffDecision
    comment: str
    waivers: list[Waiver]
    envelope_sha256: str
    problems: list[str]


class Review(Contract):
    """The human side of the release: the sign-offs recorded for this version and what they add up to."""

    required: bool  # report.require_signoff
    required_signoffs: int
    state: ReviewState
    signoffs: list[SignoffView]
    problems: list[str]  # why the state is not approved: one line each, naming the file or check


# ---------------------------------------------------------------- what changed since the approved version

class RecordChange(Contract):
    """One dataset's training records in the candidate against the approved version (by record id)."""

    dataset: str
    approved: int
    candidate: int
    added: int
    removed: int
    removed_withdrawn: int  # of the removed, those the withdrawals file lists (any of the three ids)


class ParamChange(Contract):
    key: str  # dotted path in params.yaml
    approved: str | None  # JSON of the value; None: the key is not there
    candidate: str | None


class StatusChange(Contract):
    check: str
    approved: str | None  # None: the check did not exist
    candidate: str | None


class Changes(Contract):
    """What a reviewer reads first: the candidate against the version under alias `approved`. A list is None
    where the approved version did not record what it needs, and `missing` says what."""

    approved_version: str
    approved_run_id: str
    records: list[RecordChange] | None
    params: list[ParamChange] | None
    commits: list[str] | None  # "<short hash> <subject>", oldest first
    commits_between: tuple[str, str]  # (approved commit, candidate commit)
    statuses: list[StatusChange]
    regression: dict[str, int]  # regression checks per status
    missing: list[str]


Release.model_rebuild()
