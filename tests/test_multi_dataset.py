"""Several datasets in one model: each epoch drawn from them by weight, every one logged as an MLflow input and
listed in the training records, consent-check finding a withdrawal in any of them, and one-line errors for a list
the model cannot train on."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from pipeline import PipelineError
from pipeline.artifacts import Layout
from pipeline.data import Batches, Draws, Mixture, SplitPixels, largest_remainder, loader
from pipeline.params import AugmentSettings, load_params
from pipeline.pretrain import check_listed
from tests.conftest import ROOT, Workspace, mlflow_env, small_params

CPU = torch.device("cpu")


def epoch_of(data: SplitPixels, batch_size: int, epoch: int, workers: int = 0, **slicing) -> list[dict]:
    batches = Batches(len(data), batch_size, shuffle=True, seed=3, **slicing)
    batches.epoch = epoch
    return list(loader(data, batches, workers, CPU))


def test_an_epoch_draws_each_dataset_by_its_weight_and_one_dataset_draws_as_before(tmp_path: Path):
    sizes = (60, 20)
    for k, size in enumerate(sizes):
        np.save(tmp_path / f"{k}.npy", np.full((size, 8, 8, 1), k, dtype=np.uint8))
    paths = [tmp_path / f"{k}.npy" for k in range(len(sizes))]
    draws = Draws(3, 4, AugmentSettings())

    assert largest_remainder(80, [1, 3]) == (20, 60) and largest_remainder(10, [1, 1, 1]) == (4, 3, 3)
    mixture = Mixture(sizes, [1, 3], seed=3)
    rows = mixture.epoch_rows(0)
    assert len(rows) == 80 and np.bincount(rows >= 60).tolist() == [20, 60]
    assert len(set(rows[:20])) == 20, "a share below the size draws distinct rows of that dataset"
    assert np.bincount(rows[20:] - 60).tolist() == [3] * 20, "a share of 3x the size cycles through every row"
    assert not np.array_equal(rows, mixture.epoch_rows(1))
    assert np.array_equal(rows, Mixture(sizes, [1, 3], seed=3).epoch_rows(0)), "deterministic"

    # read through the loader: the pixels (each file's value) follow the shares, whatever the workers
    data = SplitPixels(paths, draws, [1, 3])
    whole = epoch_of(data, 8, epoch=0)
    assert torch.equal(torch.cat([b["pixels"][:, 0, 0, 0] for b in whole]).bincount(), torch.tensor([20, 60]))
    assert all(torch.equal(b["pixels"][:, 0, 0, 0], (b["rows"] >= 60).to(torch.uint8)) for b in whole)
    second = epoch_of(data, 8, epoch=0, workers=2)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(whole, second) for k in a)
    # two processes of 4: halves of the same global batches
    halves = [epoch_of(data, 4, epoch=0, rank=rank, world_size=2) for rank in (0, 1)]
    assert all(torch.equal(w[k], torch.cat([a[k], b[k]])) for w, a, b in zip(whole, *halves) for k in w)

    # one dataset of weight 1, or weights in proportion to the sizes: every row once, the batches of a plain split
    assert Mixture([60], [1], 3).whole and Mixture(sizes, [3, 1], 3).whole
    plain, weighted = epoch_of(SplitPixels(paths[0], draws), 8, 2), epoch_of(SplitPixels(paths[:1], draws, [1]), 8, 2)
    assert len(plain) == 7 and all(torch.equal(a[k], b[k]) for a, b in zip(plain, weighted) for k in a)


def bad_params(tmp_path: Path, datasets: list[dict], **extra_datasets) -> Path:
    params = small_params()
    params["datasets"].update(extra_datasets)
    params["pretrain"]["datasets"] = datasets
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


SECOND = {**small_params()["datasets"]["synthetic"], "seed": 1}


@pytest.mark.parametrize("datasets, extra, message", [
    ([{"name": "synthetic"}, {"name": "sklearn_digits"}], {},
     "params.yaml: pretrain.datasets.1: sklearn_digits has 16 px x 1 channel images, synthetic has 32 px x 3"),
    ([{"name": "synthetic"}, {"name": "imagenet"}], {},
     "params.yaml: pretrain.datasets.1.name: imagenet is not under datasets (known: synthetic, sklearn_digits)"),
    ([{"name": "synthetic"}, {"name": "synthetic", "weight": 2}], {},
     "params.yaml: pretrain.datasets: Value error, synthetic is listed more than once"),
    ([{"name": "synthetic", "weight": 0}], {},
     "params.yaml: pretrain.datasets.0.weight: Input should be greater than 0"),
    ([{"name": "synthetic"}, {"name": "synthetic_b", "weight": 1}], {"synthetic_b": SECOND},
     "data_cards/synthetic_b.yaml: consent.training_permission: 'notAllowed' does not allow training under the policy "
     "(training_not_permitted), so pretrain.datasets in"),
])
def test_a_list_the_model_cannot_train_on_is_a_one_line_error(tmp_path: Path, datasets, extra, message):
    cards = tmp_path / "data_cards"
    shutil.copytree(ROOT / "data_cards", cards)
    card = yaml.safe_load((cards / "synthetic.yaml").read_text())
    card["name"], card["consent"]["training_permission"] = "synthetic_b", "notAllowed"
    (cards / "synthetic_b.yaml").write_text(yaml.safe_dump(card))
    path = bad_params(tmp_path, datasets, **extra)
    with pytest.raises(PipelineError) as error:
        check_listed(load_params(path), path, cards)
    assert message in str(error.value) and "\n" not in str(error.value), str(error.value)


def test_the_old_single_dataset_key_and_a_bad_list_on_the_command_line(tmp_path: Path):
    space = Workspace(tmp_path)
    shutil.copytree(ROOT / "data_cards", tmp_path / "data_cards")
    params = small_params()
    params["pretrain"]["dataset"] = "synthetic"
    space.write_params(params)
    with pytest.raises(PipelineError, match=r"pretrain: Value error, `dataset` has moved to `datasets`"):
        load_params(tmp_path / "params.yaml")
    bad_params(tmp_path, [{"name": "synthetic"}, {"name": "sklearn_digits", "weight": 2}])
    result = space.run("pretrain")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: pretrain.datasets.1: sklearn_digits has 16 px x 1 channel images, synthetic has 32 px x 3"]


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory) -> Workspace:
    """The synthetic set twice, under two names with other seeds and sizes, trained into one model (weights 1 and 3)
    and taken through evaluation, the audits and the report at the smallest settings."""
    root = tmp_path_factory.mktemp("two-datasets")
    shutil.copytree(ROOT / "data_cards", root / "data_cards")
    card = yaml.safe_load((root / "data_cards" / "synthetic.yaml").read_text())
    card["name"] = "synthetic_b"
    (root / "data_cards" / "synthetic_b.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    params = small_params(200)
    first = params["datasets"]["synthetic"]
    params["datasets"] = {"synthetic": first, "synthetic_b": {**first, "seed": 1, "num_images": 120}}
    params["pretrain"].update(datasets=[{"name": "synthetic", "weight": 1}, {"name": "synthetic_b", "weight": 3}],
                              epochs=1, warmup_epochs=0)
    params["evaluate"].update(raw_pixels_images=50)
    params["audit_bias"].update(n_boot=50, max_n_boot=50)
    params["audit_shift"].update(n_boot=50, max_n_boot=50, permutations=50, max_permutations=50, max_samples=50,
                                 power_trials=10, power_permutations=50, corruption_images=16, classifier_folds=2)
    params["report"].update(n_boot=50, max_n_boot=50)
    space = Workspace(root, env=mlflow_env(root))
    space.write_params(params)
    space.run_ok(("ingest", "synthetic"), ("ingest", "synthetic_b"), ("validate",), ("prepare",), ("pretrain",),
                 ("evaluate",), ("audit-bias",), ("audit-shift",), ("report",))
    return space


def train_split(space: Workspace, name: str) -> pd.DataFrame:
    return pd.read_parquet(Layout(space.root).prepared() / name / "train.parquet")


def test_a_two_dataset_model_logs_both_inputs_and_lists_both_in_its_training_records(two_datasets: Workspace):
    root = two_datasets.root
    config = json.loads(Layout(root).config_file.read_text())
    sizes = {name: len(train_split(two_datasets, name)) for name in ("synthetic", "synthetic_b")}
    assert config["dataset"] == "synthetic"
    assert [(d["name"], d["weight"], d["train_images"]) for d in config["datasets"]] == \
        [("synthetic", 1, sizes["synthetic"]), ("synthetic_b", 3, sizes["synthetic_b"])]
    assert [d["samples_per_epoch"] for d in config["datasets"]] == list(largest_remainder(sum(sizes.values()), [1, 3]))

    client = MlflowClient(two_datasets.env["MLFLOW_TRACKING_URI"])
    run = client.get_run(json.loads(Layout(root).run_file.read_text())["run_id"])
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"synthetic-train", "synthetic-train-manifest", "synthetic_b-train",
                           "synthetic_b-train-manifest"}
    for d in config["datasets"]:
        provenance = json.loads((Layout(root).ingested() / d["name"] / "provenance.json").read_text())
        tags = {t.key: t.value for t in inputs[f"{d['name']}-train"].tags}
        assert tags["card_sha256"] == provenance["card"]["sha256"] == run.data.tags[f"data.{d['name']}.card_sha256"]
        assert tags["data_md5"] == d["train_md5"] and inputs[f"{d['name']}-train"].dataset.digest == d["train_md5"][:8]
        assert tags["mlflow.data.context"] == "training" and tags["weight"] == f"{d['weight']:g}"
        assert run.data.tags[f"dvc.md5.data/prepared/{d['name']}/train.parquet"]

    governance = Layout(root).governance
    records = pd.read_csv(governance / "training_records.csv", dtype=str)
    assert list(records.columns) == ["record_id", "sha256", "source_sha256", "dataset"]
    assert records["dataset"].value_counts().to_dict() == sizes
    assert set(records.loc[records["dataset"] == "synthetic_b", "record_id"]) == \
        set(train_split(two_datasets, "synthetic_b")["record_id"])
    release = json.loads((governance / "release.json").read_text())
    consent = {c["id"]: c for c in release["checks"] if c["area"] == "consent"}
    assert consent["consent.training_records.synthetic_b"]["training_records"] == sizes["synthetic_b"]
    assert [d["name"] for d in release["model"]["trained_on"]] == ["synthetic", "synthetic_b"]
    report, card = (governance / "report.md").read_text(), (governance / "model_card.md").read_text()
    assert "**Trained on but not audited: synthetic\\_b**" in report
    assert f"| synthetic\\_b | {sizes['synthetic_b']} | CC-BY-4.0 | explicit_opt_in | allowed |" in report
    assert f"- {sizes['synthetic_b']} training records of synthetic\\_b (licence CC-BY-4.0" in card
    assert "Trained on but not evaluated or audited: synthetic\\_b" in card


def test_consent_check_finds_a_withdrawal_in_the_second_dataset(two_datasets: Workspace, tmp_path: Path):
    withdrawn = train_split(two_datasets, "synthetic_b").iloc[0]
    steward = Workspace(tmp_path, env=two_datasets.env)
    (tmp_path / "data_cards").mkdir()
    shutil.copy(two_datasets.root / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "data_cards" / "withdrawals.csv").write_text(
        f"id,requested_at,note\n{withdrawn['sha256']},2026-11-26,subject asked\n")
    result = steward.run("consent-check")
    assert result.returncode == 1, result.stderr
    run_id = json.loads(Layout(two_datasets.root).run_file.read_text())["run_id"]
    assert result.stdout.splitlines() == [f"mae-encoder version 1 (run {run_id}): trained on 1 withdrawn records: "
                                          f"synthetic_b/{withdrawn['record_id']}"]
