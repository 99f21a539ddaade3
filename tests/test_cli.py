"""The command line explains itself, and a user's mistake never ends in a traceback."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_cli


@pytest.mark.parametrize("command, mentions", [
    ((), "dvc repro"),
    (("card", "check"), "field path"),
    (("ingest",), "quarantine.parquet"),
    (("validate",), "critical"),
    (("prepare",), "heldout"),
    (("pretrain",), "torchrun"),
])
def test_every_command_has_help(command, mentions):
    result = run_cli(*command, "--help", cwd=ROOT)
    assert result.returncode == 0
    assert mentions in " ".join(result.stdout.split())


def test_a_missing_params_file_is_one_line(tmp_path):
    result = run_cli("ingest", "synthetic", "--params", str(tmp_path / "nope.yaml"), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: file not found"
