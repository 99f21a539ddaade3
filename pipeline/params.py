"""Typed view of params.yaml: the one place that knows its shape."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline import PipelineError
from pipeline.presets import POOLS, PRESETS

DEFAULT_PARAMS = Path("params.yaml")


class _Strict(BaseModel):
    """Unknown keys refused; every number finite (`.inf` would make a tolerance no evidence can fail)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class SiteEffects(_Strict):
    """Camera effects of one synthetic acquisition site."""

    share: float = Field(gt=0)
    blur: float = Field(default=0.0, ge=0, description="Gaussian blur sigma in pixels")
    noise: float = Field(default=0.0, ge=0, description="additive Gaussian noise std, in [0, 1] units")
    color_cast: tuple[float, float, float] = (1.0, 1.0, 1.0)
    collected_from: str = Field(description="ISO date the site started collecting")
    collected_to: str


class DefectRates(_Strict):
    """Fractions of records planted with each governance defect (written down in planted.json)."""

    consent_withdrawn: float = Field(default=0.0, ge=0, le=1)
    consent_missing: float = Field(default=0.0, ge=0, le=1)
    license_disallowed: float = Field(default=0.0, ge=0, le=1)
    duplicate_image: float = Field(default=0.0, ge=0, le=1)
    near_duplicate: float = Field(default=0.0, ge=0, lt=1, description="accepted near-copies of earlier records: "
                                                                       "re-encoded, resized, brightness-shifted or "
                                                                       "cropped")

    @model_validator(mode="after")
    def _total_below_one(self) -> DefectRates:
        if sum(self.model_dump().values()) >= 1:
            raise ValueError("defect rates must add up to less than 1")
        return self


class _ImageSettings(_Strict):
    source: str = Field(description="what the records are read from; dvc.yaml tracks it as a dependency")
    image_size: int = Field(gt=0, le=1024)
    channels: Literal[1, 3]


class _GeneratedSettings(_ImageSettings):
    """A source whose records come from code: `source` names its module, so DVC re-runs when it changes."""

    @model_validator(mode="after")
    def _source_is_module(self):
        expected = f"pipeline/sources/{self.kind}.py"
        if self.source != expected:
            raise ValueError(f"source must be {expected!r} for kind {self.kind!r}")
        return self


class SyntheticSettings(_GeneratedSettings):
    kind: Literal["synthetic"]
    seed: int = 0
    num_images: int = Field(gt=0)
    num_contributors: int = Field(default=200, gt=0)
    group_proportions: dict[str, float]
    sites: dict[str, SiteEffects]
    defects: DefectRates = DefectRates()
    disallowed_license: str = "CC-BY-NC-4.0"

    @field_validator("group_proportions")
    @classmethod
    def _positive_shares(cls, value: dict[str, float]) -> dict[str, float]:
        if not value or any(share <= 0 for share in value.values()):
            raise ValueError("needs at least one group, each with a positive share")
        return value


class DigitsSettings(_GeneratedSettings):
    kind: Literal["sklearn_digits"]


class ImageFolderSettings(_ImageSettings):
    kind: Literal["image_folder"]
    metadata: str = Field(default="metadata.csv", description="the CSV inside the `source` folder")


SOURCE_KINDS = ("synthetic", "sklearn_digits", "image_folder")
DatasetSettings = Annotated[
    SyntheticSettings | DigitsSettings | ImageFolderSettings, Field(discriminator="kind")
]


class IngestSettings(_Strict):
    """What ingest produces (every key but `engine` and `workers`, which dvc.yaml lists one by one) and how it runs
    (those two: the outputs are the same whatever they are, so changing them re-runs nothing)."""

    shard_size: int = Field(default=4096, gt=0)
    max_image_pixels: int = Field(default=50_000_000, gt=0, description="decompression-bomb limit")
    max_file_bytes: int = Field(default=64 * 2**20, gt=0)
    alpha_background: int = Field(default=255, ge=0, le=255)
    pseudonym_salt: str = Field(min_length=8, description="overridden by $MAE_PIPELINE_SALT")
    engine: Literal["local", "ray"] = Field(default="local", description="local: a process pool; ray: Ray Data, on "
                                                                         "a local Ray or the cluster at $RAY_ADDRESS")
    workers: int | None = Field(default=None, gt=0, description="processes (local) or CPUs of the local Ray; "
                                                                "null: the machine's cores")


class Policy(_Strict):
    allowed_licenses: list[str]
    accepted_consent_statuses: list[str]
    accepted_consent_bases: list[str]
    accept_undocumented_consent: bool = False
    accept_constrained_permission: bool = False
    withdrawals_file: str


class NearDuplicateSettings(_Strict):
    """How near-copies are found (pipeline.near_duplicates): candidates from hashes, each decided on pixels."""

    phash_distance: int = Field(ge=0, le=63, description="candidates: pHashes at most this many bits apart")
    hashes: int = Field(ge=1, le=8, description="candidates: thumbnail SimHashes, each drawn independently")
    hash_distance: int = Field(ge=0, le=63, description="candidates: SimHashes at most this many bits apart")
    min_correlation: float = Field(gt=0, le=1, description="a candidate whose 8 x 8 thumbnails correlate at least "
                                                           "this much, and")
    min_detail_correlation: float = Field(gt=0, le=1, description="whose 16 x 16 thumbnails at least this much, is "
                                                                  "a near-duplicate (validate warns, prepare keeps "
                                                                  "it in its group's split)")


class ValidationSettings(_Strict):
    near_constant_std: float = Field(ge=0)
    max_constant_fraction: float = Field(ge=0, le=1)
    pixel_mean_range: tuple[float, float]
    min_group_count: int = Field(ge=0)
    quarantine_fraction_warning: float = Field(ge=0, le=1)
    quarantine_fraction_critical: float = Field(ge=0, le=1)
    examples: int = Field(default=5, ge=0)
    near_duplicates: NearDuplicateSettings
    chunk_rows: int = Field(default=100_000, gt=0, description="a manifest with more records is validated chunk "
                                                               "by chunk, never as one frame")

    @model_validator(mode="after")
    def _ordered(self) -> ValidationSettings:
        low, high = self.pixel_mean_range
        if not 0 <= low < high <= 255:
            raise ValueError("pixel_mean_range must be [low, high] with 0 <= low < high <= 255")
        if self.quarantine_fraction_warning > self.quarantine_fraction_critical:
            raise ValueError("quarantine_fraction_warning must not exceed quarantine_fraction_critical")
        return self


class PrepareSettings(_Strict):
    seed: int = 0
    val_fraction: float = Field(ge=0, lt=1)
    test_fraction: float = Field(ge=0, lt=1)

    @model_validator(mode="after")
    def _leaves_training_data(self) -> PrepareSettings:
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError("val_fraction + test_fraction must leave some data for training")
        return self


class AugmentSettings(_Strict):
    """The MAE recipe's augmentation, applied per batch on the device; every parameter is drawn from a generator
    seeded by (seed, epoch, sample), so it does not depend on loader workers or DDP processes."""

    flip: bool = Field(default=True, description="horizontal flip with probability 0.5")
    random_resized_crop: bool = Field(default=False, description="crop a random box, resized back (bicubic)")
    scale: tuple[float, float] = Field(default=(0.2, 1.0), description="of the image's area (the paper: 0.2-1.0)")
    ratio: tuple[float, float] = Field(default=(0.75, 4 / 3), description="of the box's width to its height")

    @model_validator(mode="after")
    def _ranges(self) -> AugmentSettings:
        low, high = self.scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale {list(self.scale)} must be [low, high] with 0 < low <= high <= 1")
        if not 0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio {list(self.ratio)} must be [low, high] with 0 < low <= high")
        return self


Auto = Literal["auto"]


class TrainingDataset(_Strict):
    """One dataset whose prepared train split trains the model, and its weight in each epoch's draws."""

    name: str
    weight: float = Field(default=1.0, gt=0, description="share of each epoch's draws, relative to the others' "
                                                          "weights")


class PretrainSettings(_Strict):
    datasets: list[TrainingDataset] = Field(min_length=1, description="the datasets that train the model (same "
                                            "image size and channels); the first is the one evaluate and the "
                                            "audits judge")
    preset: str = "micro"
    patch_size: int = Field(gt=0)
    mask_ratio: float = Field(gt=0, lt=1)
    norm_pix_loss: bool = True
    epochs: int = Field(gt=0)
    batch_size: int = Field(gt=0, description="per process")
    accum_steps: int = Field(default=1, gt=0)
    base_lr: float = Field(gt=0, description="lr = base_lr x effective batch / 256")
    min_lr: float = Field(default=0.0, ge=0)
    warmup_epochs: float = Field(default=0.0, ge=0)
    weight_decay: float = Field(default=0.05, ge=0)
    bf16: Auto | bool = Field(default="auto", description="autocast; auto: on CUDA where supported (emulated, so "
                                                          "slower, on most CPUs)")
    compile: Auto | bool = Field(default="auto", description="torch.compile the training step; auto: on CUDA")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda where present")
    augment: AugmentSettings = AugmentSettings()
    workers: int = Field(default=0, ge=0, description="DataLoader worker processes (0: read in the training process)")
    prefetch: int = Field(default=2, gt=0, description="batches each worker reads ahead")
    log_every: int = Field(default=10, gt=0, description="optimiser steps between reads of the losses (each read "
                                                         "waits for the device)")
    checkpoint_every: int = Field(default=1, gt=0, description="epochs between resumable checkpoints")
    checkpoint_every_steps: int | None = Field(default=None, gt=0, description="also every this many optimiser "
                                                                               "steps, mid-epoch")
    seed: int = 0
    threads: int = Field(default=2, gt=0, description="CPU threads per process, fixed for reproducible sums")
    experiment: str = "mae-pretrain"
    figure_images: int = Field(default=8, ge=1)
    monitor_images: int | None = Field(default=512, gt=0, description="val images whose masked loss is logged "
                                       "each epoch (the first of the split; null: all); the final val loss uses all")

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        if isinstance(data, dict) and "flip" in data:
            raise ValueError("`flip` has moved to `augment.flip`")
        if isinstance(data, dict) and "dataset" in data:
            raise ValueError(f"`dataset` has moved to `datasets` (a list): datasets: [{{name: {data['dataset']}, "
                             "weight: 1}]")
        return data

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, value: list[TrainingDataset]) -> list[TrainingDataset]:
        names = [entry.name for entry in value]
        twice = next((name for k, name in enumerate(names) if name in names[:k]), None)
        if twice is not None:
            raise ValueError(f"{twice} is listed more than once")
        return value

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value


class EvaluateSettings(_Strict):
    seed: int = Field(default=0, description="fixes the masks, so two models or runs compare on the same ones")
    mask_ratio: float = Field(gt=0, lt=1)
    pool: Literal[POOLS] = Field(default="avg", description="encoder feature: class token, mean patch token, or "
                                 "every block's mean patch token (blocks); the logged encoder returns it too")
    probe_c: float = Field(default=1.0, gt=0, description="inverse L2 strength of the logistic-regression probe")
    probe_max_iter: int = Field(default=1000, gt=0)
    knn_k: int = Field(default=20, gt=0)
    batch_size: int = Field(default=256, gt=0)
    workers: int = Field(default=0, ge=0, description="DataLoader worker processes")
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto: cuda where present")
    raw_pixels_images: int = Field(default=2500, ge=10, description="the raw-pixel baseline's seeded sample per split "
                                                                    "(bounds its memory)")
    raw_pixels_size: int = Field(default=32, ge=1, description="raw pixels area-averaged to at most this many a side")
    figure_images: int = Field(default=8, ge=1, description="images per group / domain grid")
    threads: int = Field(default=2, gt=0)


class BootstrapSettings(_Strict):
    """Resampling shared by every bootstrap check (pipeline.audit.stats.compare)."""

    n_boot: int = Field(default=1000, ge=50, description="bootstrap resamples to start with")
    max_n_boot: int = Field(default=32000, ge=50, description="resamples are doubled up to this while a bound "
                                                              "lies within its Monte-Carlo error of a threshold")
    confidence: float = Field(default=0.95, gt=0.5, lt=1, description="of each family of intervals")
    power: float = Field(default=0.8, gt=0, lt=1, description="for the smallest detectable difference")
    seed: int = 0

    @model_validator(mode="after")
    def _cap_above_start(self) -> BootstrapSettings:
        if self.max_n_boot < self.n_boot:
            raise ValueError("max_n_boot must be at least n_boot")
        return self


Adjustment = Literal["bonferroni", "sidak", "none"]


class BiasSettings(BootstrapSettings):
    splits: list[Literal["val", "test", "heldout"]] = Field(default=["val", "test"], min_length=1,
                                                           description="images the model never saw")
    min_group_size: int = Field(default=30, ge=1, description="smaller groups: insufficient data, values withheld")
    reference_groups: dict[str, str] = Field(default={}, description="attribute -> the group every other is "
                                                                     "compared with (default: the best-served)")
    adjustment: Adjustment = Field(default="bonferroni", description="for more than one comparison per metric "
                                                                     "and grouping")
    max_relative_error_gap: float = Field(gt=0, description="tolerance on a group's reconstruction error / the "
                                                            "reference's - 1 (±)")
    max_accuracy_gap: float = Field(gt=0, le=1, description="tolerance on a group's probe / kNN accuracy - the "
                                                            "reference's (±)")
    min_representation_ratio: float = Field(default=0.8, gt=0, le=1,
                                            description="training share / population share below it is flagged")


class ShiftSettings(BootstrapSettings):
    alpha: float = Field(default=0.05, gt=0, lt=1, description="significance level of the drift test")
    permutations: int = Field(default=500, ge=50)
    max_permutations: int = Field(default=8000, ge=50, description="permutations are doubled up to this while "
                                                                   "the p-value lies within its Monte-Carlo error "
                                                                   "of alpha")
    max_samples: int = Field(default=500, ge=10, description="per side of a drift test (bounds its cost): past it, "
                                                               "the first images by a keyed hash of their record "
                                                               "ids")
    classifier_folds: int = Field(default=5, ge=2)
    adjustment: Adjustment = Field(default="bonferroni", description="across the held-out domains")
    power_shares: list[float] = Field(default=[0.05, 0.1, 0.2, 0.3, 0.5], min_length=1,
                                      description="shares of held-out images mixed into in-distribution ones to "
                                                  "simulate the drift test's power")
    power_trials: int = Field(default=40, ge=10, description="simulated tests per share")
    power_permutations: int = Field(default=100, ge=20, description="permutations per simulated test")
    max_domain_auc: float = Field(gt=0.5, le=1, description="a significant drift with a larger AUC fails")
    max_relative_error_increase: float = Field(gt=0, description="held-out domain error / in-distribution - 1")
    max_accuracy_drop: float = Field(gt=0, le=1)
    max_relative_mce: float = Field(gt=1, description="mean corruption error relative to clean images (decides "
                                                      "shift.corruptions only where the data has no labels)")
    max_corruption_accuracy_drop: float = Field(gt=0, le=1, description="probe accuracy lost under corruption, mean "
                                                                        "over corruptions and severities")
    corruption_images: int = Field(default=256, ge=1)
    mask_ratios: list[float] = Field(default=[0.25, 0.5, 0.75, 0.9], min_length=1)
    overtrust_images: int = Field(default=2, ge=1)

    @field_validator("mask_ratios", "power_shares")
    @classmethod
    def _fractions(cls, value: list[float]) -> list[float]:
        if not all(0 < r < 1 for r in value):
            raise ValueError("must lie strictly between 0 and 1")
        return value

    @model_validator(mode="after")
    def _permutation_cap(self) -> ShiftSettings:
        if self.max_permutations < self.permutations:
            raise ValueError("max_permutations must be at least permutations")
        return self


class MaxRegression(_Strict):
    """How much worse than the approved model a candidate may be, per metric, before its check fails."""

    reconstruction_error: float = Field(default=0.1, gt=0, description="candidate / approved error - 1")
    probe_accuracy: float = Field(default=0.02, gt=0, description="approved - candidate accuracy")
    knn_accuracy: float = Field(default=0.02, gt=0, description="approved - candidate accuracy")
    bias: float = Field(default=0.05, gt=0, description="growth of a bias check's harm (its gap's size)")
    shift: float = Field(default=0.05, gt=0, description="growth of a shift check's harm")
    memorization: float = Field(default=0.05, gt=0, description="growth of a memorization gap")


# The checks that protect people, and the model's quality: absence of evidence does not approve them.
PROTECTING = ["model.*", "bias.*", "shift.error.*", "shift.accuracy.*", "shift.corruptions", "memorization.*"]


class BlockOn(_Strict):
    """Per status, the check-id patterns that block the release with it."""

    fail: list[str] = Field(default=["*"], description="checks a fail blocks")
    inconclusive: list[str] = Field(default=PROTECTING, description="checks an inconclusive blocks")


class BaselineMargins(_Strict):
    """How far the model must beat each trivial baseline on unseen images, paired on the same images (the model.*
    checks): 0, by any amount its interval shows; above 0, by at least that; below 0, it may trail by that much."""

    reconstruction: float = Field(default=0.0, description="1 - model / patch-mean hidden-pixel error")
    probe: float = Field(default=0.0, description="MAE - baseline (random init, raw pixels) probe accuracy")
    knn: float = Field(default=0.0, description="MAE - baseline kNN accuracy")


class ReportSettings(BootstrapSettings):
    registered_model: str = Field(default="mae-encoder", pattern=r"^[A-Za-z0-9_.-]+$")
    block_on: BlockOn = BlockOn()
    advisory: list[str] = Field(default=[], description="check-id patterns reported but not blocking")
    max_memorization_gap: float = Field(gt=0, description="unseen error / training error - 1 (one-sided)")
    max_regression: MaxRegression = MaxRegression()
    min_margin_over_baselines: BaselineMargins = BaselineMargins()
    figure_width: int = Field(default=720, ge=100)
    # the gate proposes, a person disposes: alias `approved` only from valid sign-offs (pipeline.review)
    require_signoff: bool = Field(default=True, description="false: an eligible version is approved by the gate "
                                                            "alone, and the report says no human signed")
    required_signoffs: int = Field(default=1, ge=1, description="distinct reviewers whose approval is needed")
    forbid_self_signoff: bool = Field(default=False, description="refuse the training run's author as reviewer")
    reviewers_file: str = Field(default="governance/reviewers.yaml", description="reviewers' public keys and roles")


class Params(_Strict):
    """The whole file: an unknown section (a misspelt `audit_bais:`) is an error, like an unknown key."""

    datasets: dict[str, DatasetSettings]
    ingest: IngestSettings
    policy: Policy
    validation: ValidationSettings
    prepare: PrepareSettings
    pretrain: PretrainSettings
    evaluate: EvaluateSettings
    audit_bias: BiasSettings
    audit_shift: ShiftSettings
    report: ReportSettings


def field_path(loc: tuple) -> str:
    """A pydantic error location as a dotted path, without the union tag pydantic inserts after a dataset."""
    parts = list(loc)
    if len(parts) > 2 and parts[0] == "datasets" and parts[2] in SOURCE_KINDS:
        del parts[2]
    return ".".join(str(part) for part in parts) or "(top level)"


def first_error(exc: ValidationError) -> str:
    """One readable line for a pydantic error: field path, message, and how many more there are."""
    errors = exc.errors()
    path = field_path(errors[0]["loc"])
    more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{path}: {errors[0]['msg']}{more}"


def read_yaml(path: Path) -> object:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PipelineError(f"{path}: file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}: " if mark else ""
        raise PipelineError(f"{path}: {where}not valid YAML ({getattr(exc, 'problem', exc)})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PipelineError(f"{path}: cannot read ({exc})") from None


def load_params(path: Path = DEFAULT_PARAMS) -> Params:
    raw = read_yaml(path)
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise PipelineError(f"{path}: {first_error(exc)}") from None


def training_datasets(params: Params, path: Path = DEFAULT_PARAMS) -> list[DatasetSettings]:
    """The settings of every dataset `pretrain.datasets` lists: each one under `datasets`, all with the image size
    and channels of the first, since one model reads them all."""
    found = []
    for k, entry in enumerate(params.pretrain.datasets):
        if entry.name not in params.datasets:
            known = ", ".join(params.datasets) or "none"
            raise PipelineError(f"{path}: pretrain.datasets.{k}.name: {entry.name} is not under datasets "
                                f"(known: {known})")
        found.append(params.datasets[entry.name])
        first, this = found[0], found[-1]
        if (this.image_size, this.channels) != (first.image_size, first.channels):
            raise PipelineError(
                f"{path}: pretrain.datasets.{k}: {entry.name} has {this.image_size} px x {this.channels} channel "
                f"images, {params.pretrain.datasets[0].name} has {first.image_size} px x {first.channels}")
    return found


def dataset_settings(params: Params, dataset: str, path: Path = DEFAULT_PARAMS):
    try:
        return params.datasets[dataset]
    except KeyError:
        known = ", ".join(params.datasets) or "none"
        raise PipelineError(f"{path}: datasets.{dataset}: no such dataset (known: {known})") from None
