"""The ingest stage on the embedded sources: nothing lost, defects caught, deterministic, fail-closed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

from pipeline.artifacts import Layout
from pipeline.sources.records import pixels_sha256
from tests.conftest import ROOT, Workspace, small_params

PLANTED_REASON = {
    "consent_withdrawn": "consent_withdrawn",
    "consent_missing": "consent_missing",
    "license_disallowed": "license_not_allowed",
    "duplicate_image": "duplicate_image",
}


def ingest(space: Workspace, dataset: str = "synthetic"):
    result = space.run("ingest", dataset)
    assert result.returncode == 0, result.stderr
    out = space.ingested(dataset)
    return (pd.read_parquet(out / "manifest.parquet"), pd.read_parquet(out / "quarantine.parquet"),
            json.loads((out / "provenance.json").read_text()))


def load_pixels(folder, manifest: pd.DataFrame) -> np.ndarray:
    shards = {name: np.load(folder / name, mmap_mode="r") for name in manifest.pixels_file.unique()}
    return np.stack([shards[f][i] for f, i in zip(manifest.pixels_file, manifest.pixels_index)])


def test_counts_add_up_and_every_planted_defect_is_quarantined_for_its_reason(workspace: Workspace):
    manifest, quarantine, provenance = ingest(workspace)
    counts = provenance["counts"]
    assert counts["read"] == 300 == len(manifest) + len(quarantine)
    assert counts["accepted"] == len(manifest) and counts["quarantined"] == len(quarantine)
    assert sum(counts["by_reason"].values()) == counts["quarantined"]
    assert counts["by_reason"] == quarantine.reason.value_counts().to_dict()
    assert set(provenance["reasons"]) == set(counts["by_reason"])

    planted = json.loads((workspace.ingested("synthetic") / "planted.json").read_text())
    defects = {record_id: p["defect"] for record_id, p in planted.items() if p["defect"] != "near_duplicate"}
    assert set(defects.values()) == set(PLANTED_REASON), "the default rates plant every defect kind"
    by_id = quarantine.set_index("record_id")
    for record_id, defect in defects.items():
        assert by_id.loc[record_id, "reason"] == PLANTED_REASON[defect], record_id
    assert not set(defects) & set(manifest.record_id)
    assert set(quarantine.record_id) == set(defects), "nothing unplanted is quarantined"
    assert set(planted) - set(defects) <= set(manifest.record_id), "near-copies are accepted (pipeline.near_duplicates)"


def test_manifest_holds_governance_fields_and_pixels_match_their_hashes(workspace: Workspace):
    manifest, _, _ = ingest(workspace)
    assert manifest.record_id.is_unique and manifest.sha256.is_unique
    assert (manifest.consent_status == "granted").all() and (manifest.license == "CC-BY-4.0").all()
    assert set(manifest.group) <= {"group_a", "group_b"}
    assert set(manifest.domain) == {"site_north", "site_south", "site_east"}
    assert manifest.collected_at.notna().all() and str(manifest.collected_at.dtype) == "datetime64[us, UTC]"
    assert manifest.contributor.str.fullmatch(r"c-[0-9a-f]{20}").all()
    assert not manifest.contributor.str.contains("subject").any(), "raw contributor ids never reach the manifest"
    pixels = load_pixels(workspace.ingested("synthetic"), manifest)
    assert pixels.shape == (len(manifest), 32, 32, 3) and pixels.dtype == np.uint8
    assert [pixels_sha256(p) for p in pixels] == manifest.sha256.tolist()


def test_pixels_are_sharded(workspace: Workspace):
    params = small_params(300)
    params["ingest"]["shard_size"] = 64
    workspace.write_params(params)
    manifest, _, _ = ingest(workspace)
    files = sorted((workspace.ingested("synthetic") / "pixels").glob("*.npy"))
    assert len(files) == -(-len(manifest) // 64)
    assert manifest.groupby("pixels_file").size().max() == 64


def test_two_runs_give_byte_identical_outputs(workspace: Workspace, tmp_path_factory):
    ingest(workspace)
    first = {p.relative_to(workspace.ingested("synthetic")): p.read_bytes()
             for p in workspace.ingested("synthetic").rglob("*") if p.is_file()}
    other = Workspace(tmp_path_factory.mktemp("again"))
    (other.root / "data_cards").symlink_to(workspace.root / "data_cards")
    other.write_params(small_params())
    ingest(other)
    second = {p.relative_to(other.ingested("synthetic")): p.read_bytes()
              for p in other.ingested("synthetic").rglob("*") if p.is_file()}
    assert first.keys() == second.keys()
    for name in first:
        assert first[name] == second[name], f"{name} differs between runs"


def test_the_salt_changes_pseudonyms_but_nothing_else(workspace: Workspace):
    manifest, _, _ = ingest(workspace)
    workspace.run("ingest", "synthetic", env={"MAE_PIPELINE_SALT": "a-different-secret"})
    salted = pd.read_parquet(workspace.ingested("synthetic") / "manifest.parquet")
    assert not set(salted.contributor) & set(manifest.contributor)
    assert salted.sha256.tolist() == manifest.sha256.tolist()


def test_withdrawals_remove_records_by_id_and_by_hash(workspace: Workspace):
    manifest, _, _ = ingest(workspace)
    by_id, by_sha = manifest.record_id.iloc[3], manifest.sha256.iloc[5]
    (workspace.root / "data_cards" / "withdrawals.csv").write_text(
        f"id,requested_at,note\n{by_id},2026-01-01,asked by email\n{by_sha},2026-01-02,\n")
    after, quarantine, provenance = ingest(workspace)
    withdrawn = quarantine[quarantine.reason == "withdrawal_request"]
    assert set(withdrawn.record_id) == {by_id, manifest.record_id.iloc[5]}
    assert len(after) == len(manifest) - 2
    assert provenance["withdrawals"]["entries"] == 2


def test_a_balanced_configuration_changes_group_shares(workspace: Workspace):
    params = small_params(400)
    params["datasets"]["synthetic"]["group_proportions"] = {"group_a": 0.5, "group_b": 0.5}
    workspace.write_params(params)
    manifest, _, _ = ingest(workspace)
    share_b = (manifest.group == "group_b").mean()
    assert 0.4 < share_b < 0.6


def test_digits_keep_their_real_labels_and_undocumented_consent(workspace: Workspace):
    manifest, quarantine, provenance = ingest(workspace, "sklearn_digits")
    assert len(manifest) == 1797 and quarantine.empty
    assert sorted(manifest.label.unique()) == [str(d) for d in range(10)]
    assert (manifest.consent_status == "undocumented").all()
    assert manifest[["width", "height", "channels"]].drop_duplicates().values.tolist() == [[16, 16, 1]]


def test_policy_rejecting_undocumented_consent_quarantines_all_digits(workspace: Workspace):
    params = small_params()
    params["policy"]["accept_undocumented_consent"] = False
    workspace.write_params(params)
    manifest, quarantine, provenance = ingest(workspace, "sklearn_digits")
    assert manifest.empty and len(quarantine) == 1797
    assert provenance["counts"]["by_reason"] == {"consent_undocumented": 1797}


@pytest.mark.parametrize("break_it, expected", [
    (lambda s: s.update(num_images=-5), "params.yaml: datasets.synthetic.num_images"),
    (lambda s: s.update(colour="blue"), "params.yaml: datasets.synthetic.colour"),
    (lambda s: s.update(source="elsewhere.py"), "params.yaml: datasets.synthetic"),
    (lambda s: s["defects"].update(consent_missing=0.99), "params.yaml: datasets.synthetic.defects"),
])
def test_broken_params_give_one_line_and_no_outputs(workspace: Workspace, break_it, expected):
    params = small_params()
    break_it(params["datasets"]["synthetic"])
    workspace.write_params(params)
    result = workspace.run("ingest", "synthetic")
    assert result.returncode == 2
    assert result.stderr.strip().startswith(f"error: {expected}"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not (workspace.root / "data").exists()


def test_broken_card_gives_one_line_and_keeps_earlier_outputs(workspace: Workspace):
    ingest(workspace)
    before = (workspace.ingested("synthetic") / "manifest.parquet").read_bytes()
    card_file = workspace.root / "data_cards" / "synthetic.yaml"
    card = yaml.safe_load(card_file.read_text())
    card["license"]["spdx"] = "Who-Knows"
    card_file.write_text(yaml.safe_dump(card))
    result = workspace.run("ingest", "synthetic")
    assert result.returncode == 2
    line = result.stderr.strip()
    assert "\n" not in line and "data_cards/synthetic.yaml: license.spdx" in line
    assert (workspace.ingested("synthetic") / "manifest.parquet").read_bytes() == before
    assert not list(Layout(workspace.root).ingested().glob(".*partial"))


def test_unknown_dataset_and_missing_withdrawals_file(workspace: Workspace):
    result = workspace.run("ingest", "nope")
    assert result.returncode == 2 and "datasets.nope: no such dataset" in result.stderr
    (workspace.root / "data_cards" / "withdrawals.csv").unlink()
    result = workspace.run("ingest", "synthetic")
    assert result.returncode == 2 and "withdrawals.csv: withdrawals file not found" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_ingest_leaves_no_partial_folder(workspace: Workspace, signum: int):
    params = small_params(3000)
    params["ingest"]["workers"] = 2  # a process pool, whose workers must end with the stage
    workspace.write_params(params)
    partial = Layout(workspace.root).ingested() / ".synthetic.partial"
    process = subprocess.Popen([sys.executable, "-m", "pipeline", "ingest", "synthetic"], cwd=workspace.root,
                               env={**os.environ, "PYTHONPATH": str(ROOT)}, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not partial.exists():  # interrupt it while it writes
            assert process.poll() is None and time.monotonic() < deadline, "ingest ended before it was interrupted"
            time.sleep(0.01)
        workers = psutil.Process(process.pid).children()
        assert len(workers) == 2
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    # 130, or death by SIGINT after the stage handled it and cleaned up (a shell reports both as 130): seen once
    # under load, cause not pinned down; what matters is the one line and that no partial folder is left
    assert process.returncode in (130, -signal.SIGINT) and stderr.strip().endswith("error: interrupted"), stderr
    assert not any(partial.parent.iterdir()), "no outputs and no .partial folder"
    assert not [w for w in workers if w.is_running() and w.status() != psutil.STATUS_ZOMBIE], "workers terminated"
