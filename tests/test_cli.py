"""The command line explains itself, and a user's mistake never ends in a traceback."""

from __future__ import annotations

import pytest

from tests.conftest import ROOT, run_cli

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`


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


def test_card_check_and_help_do_not_load_torch():
    """Checking a card or asking for help is instant: neither imports torch (the presets live apart)."""
    import subprocess
    import sys

    probe = ("import sys\nfrom pipeline.__main__ import main\n"
             "status = main(['card', 'check', *sys.argv[1:]])\n"
             "try:\n    main(['pretrain', '--help'])\nexcept SystemExit:\n    pass\n"
             "print('torch loaded' if 'torch' in sys.modules else 'no torch', status)\n")
    cards = sorted(str(p) for p in (ROOT / "data_cards").glob("*.yaml"))
    result = subprocess.run([sys.executable, "-c", probe, *cards], cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "no torch 0"


@pytest.mark.parametrize("section, expected", [
    ({"audit_bais": {}}, "audit_bais: Extra inputs are not permitted"),
    ({"report": {"n_bot": 10}}, "report.n_bot: Extra inputs are not permitted"),
    # infinity would start a training that cannot converge, or make a tolerance no evidence can fail
    ({"pretrain": {"base_lr": float("inf")}}, "pretrain.base_lr: Input should be a finite number"),
    ({"audit_bias": {"max_relative_error_gap": float("inf")}},
     "audit_bias.max_relative_error_gap: Input should be a finite number"),
    ({"report": {"max_memorization_gap": float("nan")}},
     "report.max_memorization_gap: Input should be a finite number"),
])
def test_an_unknown_params_section_or_key_is_one_line(workspace, section, expected):
    import yaml

    params = yaml.safe_load((workspace.root / "params.yaml").read_text())
    for key, value in section.items():
        params[key] = {**params.get(key, {}), **value}
    workspace.write_params(params)
    result = workspace.run("prepare")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: params.yaml: {expected}"
