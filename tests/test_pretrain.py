"""Pretraining: the optimiser rules, resume after kill -9, DDP over two processes, and MLflow lineage."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from pipeline import PipelineError
from pipeline.artifacts import Layout
from pipeline.data import Draws, SplitPixels
from pipeline.mae import build
from pipeline.normalisation import Normalisation
from pipeline.params import PretrainSettings
from pipeline.train import State, learning_rate, param_groups, train
from tests.conftest import ROOT, Workspace, mlflow_env, small_params, synthetic_params, synthetic_workspace

TINY_TRAINING = dict(epochs=4, batch_size=32, checkpoint_every=1, warmup_epochs=1, figure_images=4, threads=1)


def test_weight_decay_skips_biases_norms_tokens_and_position_embeddings():
    model = build("micro", 32, 4, 3)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert all(name.endswith("weight") and "norm" not in name for name in decayed)
    assert {"cls_token", "mask_token"} <= {names[id(p)] for p in no_decay["params"]}
    assert "pos_embed" not in names.values() or all(not p.requires_grad for n, p in model.named_parameters()
                                                    if "pos_embed" in n)


def test_learning_rate_warms_up_linearly_then_follows_a_cosine():
    assert learning_rate(0, 100, 10, 1.0, 0.0) == 0.0
    assert learning_rate(5, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert learning_rate(10, 100, 10, 1.0, 0.0) == pytest.approx(1.0)
    assert learning_rate(55, 100, 10, 1.0, 0.0) == pytest.approx(0.5)
    assert learning_rate(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def train_in_process(split: Path, checkpoint: Path, on_step=None, **changes) -> tuple[dict, State]:
    """A micro model trained by the real loop on a tiny memory-mapped split: 6 steps an epoch of 2 micro-batches."""
    settings = PretrainSettings.model_validate({
        **small_params()["pretrain"], "epochs": 2, "batch_size": 8, "accum_steps": 2, "checkpoint_every": 100,
        "augment": {"flip": True, "random_resized_crop": True}, **changes})
    torch.manual_seed(0)
    model = build("micro", 16, 4, 3)
    data = SplitPixels(split, Draws(settings.seed, 4, settings.augment))
    threads = torch.get_num_threads()
    torch.set_num_threads(settings.threads)  # as the stage does
    try:
        state = train(model, data, Normalisation.fit(data.pixels), settings, checkpoint, "fingerprint",
                      on_step=on_step)
    finally:
        torch.set_num_threads(threads)
    return model.state_dict(), state


@pytest.fixture
def tiny_split(tmp_path: Path) -> Path:
    path = tmp_path / "train.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (100, 16, 16, 3), dtype=np.uint8))
    return path


def test_two_runs_that_differ_only_in_loader_workers_end_with_identical_weights(tiny_split: Path, tmp_path: Path):
    a, state = train_in_process(tiny_split, tmp_path / "a.pt", workers=0)
    b, _ = train_in_process(tiny_split, tmp_path / "b.pt", workers=2, prefetch=1)
    assert state.step == 12
    assert all(torch.equal(a[k], b[k]) for k in a)


class Crash(Exception):
    pass


def test_a_run_stopped_mid_epoch_resumes_from_the_step_checkpoint_with_the_same_weights_and_history(
        tiny_split: Path, tmp_path: Path):
    straight, straight_state = train_in_process(tiny_split, tmp_path / "straight.pt", checkpoint_every_steps=4)

    def crash(step: int, values: dict) -> None:
        if step == 7:
            raise Crash
    checkpoint = tmp_path / "interrupted.pt"
    with pytest.raises(Crash):
        train_in_process(tiny_split, checkpoint, on_step=crash, checkpoint_every_steps=4, log_every=1)
    saved = torch.load(checkpoint, weights_only=True)
    assert (saved["epoch"], saved["step"], saved["position"], len(saved["epoch_losses"])) == (0, 4, 8, 8)
    resumed, resumed_state = train_in_process(tiny_split, checkpoint, checkpoint_every_steps=4)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert [h["train_loss"] for h in resumed_state.history] == [h["train_loss"] for h in straight_state.history]


def test_a_non_finite_loss_read_late_still_names_its_step(tiny_split: Path, tmp_path: Path):
    with pytest.raises(PipelineError, match=r"non-finite loss \(nan\) at epoch 1, step \d+"):
        train_in_process(tiny_split, tmp_path / "c.pt", base_lr=1e12, warmup_epochs=0, log_every=100)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    """A small synthetic dataset ingested, validated and split once for every test here."""
    space = synthetic_workspace(tmp_path_factory.mktemp("prepared"), 400)
    space.run_ok(("ingest", "synthetic"), ("validate",), ("prepare",))
    return space.root


def training_space(prepared: Path, tmp_path: Path, **changes) -> Workspace:
    space = Workspace(tmp_path)
    (space.root / "data").mkdir(parents=True)
    for name in ("prepared", "ingested"):
        (space.root / "data" / name).symlink_to(prepared / "data" / name)
    (space.root / "data_cards").symlink_to(prepared / "data_cards")  # pretrain checks each card allows training
    params = synthetic_params(400)
    params["pretrain"].update(TINY_TRAINING, **changes)
    space.write_params(params)
    return space


def weights(space: Workspace) -> dict[str, torch.Tensor]:
    return torch.load(Layout(space.root).weights_file)


def metric_history(uri: str, key: str) -> list:
    """`key` of the one run of the pretrain experiment at `uri`, in logging order."""
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("mae-pretrain").experiment_id])
    return client.get_metric_history(run.info.run_id, key)


# checkpoints only mid-epoch (and at the end): 5 steps apart, never on an epoch's last step (7 per epoch here)
MID_EPOCH = dict(checkpoint_every=100, checkpoint_every_steps=5, log_every=1)


def test_a_sigkill_mid_epoch_and_a_rerun_end_with_the_weights_of_an_uninterrupted_run_and_log_each_step_once(
        prepared: Path, tmp_path: Path):
    straight = training_space(prepared, tmp_path / "straight", workers=2, **MID_EPOCH)
    result = straight.run("pretrain", env=mlflow_env(straight.root))
    assert result.returncode == 0, result.stderr

    interrupted = training_space(prepared, tmp_path / "interrupted", workers=2, **MID_EPOCH)
    uri = mlflow_env(interrupted.root)["MLFLOW_TRACKING_URI"]
    checkpoint = Layout(interrupted.root).checkpoint
    env = {**os.environ, "PYTHONPATH": str(ROOT), **mlflow_env(interrupted.root)}
    child = subprocess.Popen([sys.executable, "-m", "pipeline", "pretrain"], cwd=interrupted.root, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # kill once steps past the last (mid-epoch) checkpoint are in MLflow, so the resumed run re-lives logged steps;
    # the state is read with the trainer stopped (SIGSTOP), so what is checked is what the kill leaves
    deadline, client, run_id, killed = time.time() + 300, None, None, False
    while time.time() < deadline and child.poll() is None and not killed:
        if checkpoint.exists():  # the run (and its database) exists before the first checkpoint
            child.send_signal(signal.SIGSTOP)
            try:
                saved = torch.load(checkpoint, weights_only=True)
                if client is None:
                    client, run_id = MlflowClient(uri), saved["run_id"]
                logged = max(m.step for m in client.get_metric_history(run_id, "train_loss"))
                if saved["step"] >= 10 and logged > saved["step"]:
                    child.send_signal(signal.SIGKILL)
                    killed = True
            except Exception:  # no step logged yet, or stopped mid-write of the database: let it go on, look again
                pass
            if not killed:
                child.send_signal(signal.SIGCONT)
        time.sleep(0.01)
    assert killed, "training ended before it could be interrupted"
    child.wait()
    assert not Layout(interrupted.root).weights_file.exists()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["position"] > 0 and saved["epoch_losses"], "the run resumes in the middle of an epoch"
    assert max(m.step for m in metric_history(uri, "train_loss")) > saved["step"]
    resumed = interrupted.run("pretrain", env=mlflow_env(interrupted.root))
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr

    a, b = weights(straight), weights(interrupted)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
    metrics = json.loads(Layout(straight.root).pretrain_metrics_file.read_text())
    assert metrics == json.loads(Layout(interrupted.root).pretrain_metrics_file.read_text())
    # one MLflow run per model, even across the kill, holding each step once with the uninterrupted run's values
    assert client.get_run(run_id).info.status == "FINISHED"
    for key, steps in (("train_loss", metrics["steps"]), ("lr", metrics["steps"]),
                       ("val_masked_loss", metrics["epochs"])):
        history = metric_history(uri, key)
        assert sorted(m.step for m in history) == list(range(1, steps + 1)), key
        assert {m.step: m.value for m in history} == \
            {m.step: m.value for m in metric_history(mlflow_env(straight.root)["MLFLOW_TRACKING_URI"], key)}, key
    assert [m.step for m in metric_history(uri, "final_val_masked_loss")] == [0]


class Planted:
    """What a tampered checkpoint could hold: unpickling it runs os.mkdir."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.mkdir, (str(self.marker),)


def test_a_checkpoint_loads_with_weights_only_and_a_planted_one_is_never_unpickled(tmp_path: Path):
    import random

    import numpy as np

    from pipeline.train import State, World, resume, save_checkpoint

    model = build("micro", 32, 4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    path = tmp_path / "pretrain.pt"
    np.random.seed(1), random.seed(1), torch.manual_seed(1)
    save_checkpoint(path, model, optimizer, State(epoch=1, step=5, run_id="run"), "fingerprint")
    after_save = (np.random.rand(), random.random(), torch.rand(1).item())
    assert torch.load(path, weights_only=True)["step"] == 5
    np.random.seed(2), random.seed(2), torch.manual_seed(2)
    assert resume(path, model, optimizer, "fingerprint", World()) == State(1, 5, [], "run")
    assert (np.random.rand(), random.random(), torch.rand(1).item()) == after_save, "RNG states not restored"

    marker = tmp_path / "code-ran"
    torch.save({"fingerprint": "fingerprint", "payload": Planted(marker)}, path)
    assert resume(path, model, optimizer, "fingerprint", World()) is None
    assert not marker.exists()


def torchrun(space: Workspace, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), **mlflow_env(space.root)}
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             "-m", "pipeline", "pretrain"], cwd=space.root, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **popen)


def test_two_process_ddp_matches_one_process_and_resumes_mid_epoch_after_a_sigkill(prepared: Path, tmp_path: Path):
    # with gradient accumulation on both sides, so DDP's no_sync path on the first micro-batch is exercised
    single = training_space(prepared, tmp_path / "single", epochs=2, batch_size=16, accum_steps=2)
    assert single.run("pretrain", env=mlflow_env(single.root)).returncode == 0
    ddp_settings = dict(epochs=2, batch_size=8, accum_steps=2, checkpoint_every=100, checkpoint_every_steps=2)
    ddp = training_space(prepared, tmp_path / "ddp", **ddp_settings)
    straight = torchrun(ddp)
    _, errors = straight.communicate(timeout=600)
    assert straight.returncode == 0, errors[-3000:]
    a, b = weights(single), weights(ddp)
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), "DDP diverged from the single-process run"
    assert json.loads(Layout(ddp.root).run_file.read_text())["run_id"]

    # the whole torchrun group killed once a mid-epoch checkpoint exists, then started again
    interrupted = training_space(prepared, tmp_path / "interrupted", **ddp_settings)
    checkpoint = Layout(interrupted.root).checkpoint
    child = torchrun(interrupted, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and child.poll() is None:
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["step"] >= 2:
            break
        time.sleep(0.01)
    assert child.poll() is None, "training ended before it could be interrupted"
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    assert torch.load(checkpoint, weights_only=True)["position"] > 0
    resumed = torchrun(interrupted)
    _, errors = resumed.communicate(timeout=600)
    assert resumed.returncode == 0 and "resuming from" in errors, errors[-3000:]
    c = weights(interrupted)
    assert all(torch.equal(b[k], c[k]) for k in b), "the resumed DDP run differs from the uninterrupted one"


def test_non_finite_loss_stops_with_the_step(prepared: Path, tmp_path: Path):
    space = training_space(prepared, tmp_path, base_lr=1e12, warmup_epochs=0)
    result = space.run("pretrain", env=mlflow_env(space.root))
    assert result.returncode == 2
    assert "non-finite loss" in result.stderr and "step" in result.stderr
    assert "Traceback" not in result.stderr
    client = MlflowClient(mlflow_env(space.root)["MLFLOW_TRACKING_URI"])
    (run,) = client.search_runs([client.get_experiment_by_name("mae-pretrain").experiment_id])
    assert run.info.status == "FAILED", "a diverged run must not read as one that finished"


def test_mlflow_run_holds_params_lineage_datasets_figures_and_model(prepared: Path, tmp_path: Path, monkeypatch):
    import mlflow

    space = training_space(prepared, tmp_path)
    result = space.run("pretrain", env=mlflow_env(space.root))
    assert result.returncode == 0, result.stderr
    run_file = json.loads(Layout(space.root).run_file.read_text())
    client = MlflowClient(mlflow_env(space.root)["MLFLOW_TRACKING_URI"])
    run = client.get_run(run_file["run_id"])
    assert run.data.params["mask_ratio"] == "0.5" and run.data.params["preset"] == "micro"
    tags = run.data.tags
    assert len(tags["git.commit"]) in (7, 40) or tags["git.commit"] == "unknown"
    assert tags["git.dirty"] in ("true", "false", "unknown")
    train_md5 = tags["dvc.md5.data/prepared/synthetic/train.npy"]
    assert len(train_md5) == 32
    provenance = json.loads((prepared / "data" / "ingested" / "synthetic" / "provenance.json").read_text())
    assert tags["data.synthetic.card_sha256"] == provenance["card"]["sha256"]
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert {"synthetic-train", "synthetic-train-manifest"} <= set(inputs)
    assert inputs["synthetic-train"].dataset.digest == train_md5[:8]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"figures", "config.json", "pretrain_loss.csv"} <= artifacts
    assert [a.path for a in client.list_artifacts(run.info.run_id, "figures")] == ["figures/reconstructions.png"]
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(history) == run.data.metrics["final_steps"] and history[-1].step == len(history)
    models = client.search_logged_models([run.info.experiment_id])
    assert [m.name for m in models] == ["encoder"] and models[0].source_run_id == run.info.run_id
    import mlflow.pytorch

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_env(space.root)["MLFLOW_TRACKING_URI"])  # removed afterwards
    mlflow.set_tracking_uri(mlflow_env(space.root)["MLFLOW_TRACKING_URI"])
    encoder = mlflow.pytorch.load_model(f"models:/{models[0].model_id}")
    assert encoder(torch.zeros(2, 3, 32, 32)).shape == (2, 4 * 96)  # pool "blocks": each of the 4 blocks
    metrics = json.loads(Layout(space.root).pretrain_metrics_file.read_text())
    assert set(metrics) >= {"val_masked_loss", "val_patch_mean_baseline", "improvement_over_baseline"}
    assert run.data.metrics["final_val_masked_loss"] == pytest.approx(metrics["val_masked_loss"])
    assert "View run" not in result.stdout + result.stderr


def test_a_checkpoint_fingerprint_covers_params_data_world_and_code():
    from pipeline.params import PretrainSettings
    from pipeline.train import fingerprint

    settings = PretrainSettings.model_validate(small_params()["pretrain"])
    args = {"img_size": 32}
    base = fingerprint(settings, args, "data-a", 1)
    assert base == fingerprint(settings, args, "data-a", 1)
    assert base != fingerprint(settings, args, "data-b", 1)
    assert base != fingerprint(settings, args, "data-a", 2)
    assert base != fingerprint(settings.model_copy(update={"mask_ratio": settings.mask_ratio / 2}), args, "data-a", 1)
    assert base != fingerprint(settings, {"img_size": 16}, "data-a", 1)
    assert base == fingerprint(settings.model_copy(update={"workers": 4, "log_every": 1}), args, "data-a", 1), \
        "how the data is read cannot change the weights: a run may resume with more workers"
