"""Where stages hand data to each other (relative to the repository root, where DVC runs them)."""

from pathlib import Path

INGESTED = Path("data/ingested")
PREPARED = Path("data/prepared")
VALIDATION_REPORT = Path("reports/validation")
MODEL_DIR = Path("models/mae")
EVAL = Path("data/eval")
EVAL_METRICS = Path("metrics/eval.json")
EVAL_REPORT = Path("reports/eval")
BIAS_REPORT = Path("reports/bias")
SHIFT_REPORT = Path("reports/shift")
GOVERNANCE_REPORT = Path("reports/governance")
