"""What the report states, typed: gathered from the stages' hand-offs before any check is rendered."""

from __future__ import annotations

from dataclasses import dataclass, field

from pipeline.cards import DataCard
from pipeline.contracts import (
    BiasResult,
    Changes,
    Counts,
    EvalMetrics,
    MemorizationRow,
    ModelFacts,
    PretrainMetrics,
    ReleaseDecision,
    Review,
    ShiftResult,
    ValidationSummary,
    WithdrawnVersion,
)
from pipeline.params import Policy


@dataclass(frozen=True)
class DatasetEvidence:
    card: DataCard
    counts: Counts  # what ingest read, accepted and quarantined


@dataclass(frozen=True)
class Evidence:
    model: ModelFacts
    release: ReleaseDecision
    datasets: dict[str, DatasetEvidence]
    policy: Policy
    withdrawals: int  # entries in the withdrawals file
    training_records: dict[str, int]  # per dataset the model trained on: its records in training_records.csv
    validation: ValidationSummary
    validation_failures: list[str]
    pretrain: PretrainMetrics
    evaluation: EvalMetrics
    bias: BiasResult
    shift: ShiftResult
    memorization: dict[str, MemorizationRow]
    approved: str | None  # the registered version compared against ("version N (run R)"), None when none
    data_hashes: dict[str, str]
    figures: dict[str, list[tuple[str, str]]]  # area -> (file name under figures/, caption)
    review: Review  # the sign-offs recorded for this version when the report was written
    changes: Changes | None = None  # since the approved version; None when none is approved
    withdrawn_versions: list[WithdrawnVersion] = field(default_factory=list)  # other versions, withdrawn records

    @property
    def trained_card(self) -> DataCard:
        """The card of the dataset evaluated and audited."""
        return self.datasets[self.model.dataset].card

    @property
    def not_audited(self) -> list[str]:
        """Datasets the model trained on whose unseen images no evaluation or audit judged."""
        return [name for name in self.training_records if name != self.model.dataset]

    def checks(self, area: str):
        return [c for c in self.release.checks if c.area == area]
