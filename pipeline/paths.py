"""Where stages hand data to each other (relative to the repository root, where DVC runs them)."""

from pathlib import Path

INGESTED = Path("data/ingested")
PREPARED = Path("data/prepared")
VALIDATION_REPORT = Path("reports/validation")
