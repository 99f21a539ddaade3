"""Multi-node training through the code path README's "Scaling out" documents: two torchrun agents, one per
"machine", meet at a rendezvous and train the model a single process trains with the same global batch, also when
killed mid-epoch and started again with the checkpoint on rank 0's machine alone."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

from pipeline.artifacts import Layout
from tests.conftest import ROOT, Workspace, free_port

# 2 epochs, and gradient accumulation on both sides so DDP's no_sync path is exercised
TRAINING = dict(epochs=2, accum_steps=2, warmup_epochs=1, figure_images=4, threads=1)


def node(evaluated: Workspace, root: Path, batch_size: int) -> Workspace:
    """A machine's checkout: its own params and outputs, the data as `dvc pull` would bring it (the session's
    prepared data, read only), the team's tracking server."""
    space = Workspace(root, env=evaluated.env)
    (root / "data").mkdir(parents=True)
    for name in ("prepared", "ingested"):
        (root / "data" / name).symlink_to(evaluated.root / "data" / name)
    (root / "data_cards").symlink_to(evaluated.root / "data_cards")  # pretrain checks each card allows training
    params = yaml.safe_load((evaluated.root / "params.yaml").read_text())
    params["pretrain"].update(TRAINING, batch_size=batch_size)
    space.write_params(params)
    return space


def weights(space: Workspace) -> dict[str, torch.Tensor]:
    return torch.load(Layout(space.root).weights_file, weights_only=True)


def test_two_nodes_train_what_one_process_trains_and_resume_from_rank_0s_checkpoint_after_a_sigkill(
        evaluated: Workspace, tmp_path: Path):
    single = node(evaluated, tmp_path / "single", batch_size=16)
    result = single.run("pretrain")
    assert result.returncode == 0, result.stderr

    nodes = [node(evaluated, tmp_path / f"node{i}", batch_size=8) for i in (0, 1)]
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "smoke",
              "-m", "pipeline", "pretrain"]
    agents = [subprocess.Popen(launch, cwd=space.root, env={**os.environ, "PYTHONPATH": str(ROOT), **space.env},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for space in nodes]
    for agent in agents:
        _, stderr = agent.communicate(timeout=600)
        assert agent.returncode == 0, stderr[-3000:]

    # the node that got rank 0 wrote the outputs and the MLflow run; the other wrote nothing
    (main,) = [space for space in nodes if (space.root / "models").exists()]
    assert not any((space.root / "metrics").exists() for space in nodes if space is not main)
    run = json.loads(Layout(main.root).run_file.read_text())
    assert run["run_id"]
    a, b = weights(single), weights(main)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), "two nodes diverged from the single-process run"

    # killed once rank 0 has a mid-epoch checkpoint, then started again: only rank 0's machine holds the
    # checkpoint, so the other node must take its state from rank 0 (static ranks, so rank 0 is node 0 both times)
    resumed = [node(evaluated, tmp_path / f"resumed{i}", batch_size=8) for i in (0, 1)]
    for space in resumed:
        params = yaml.safe_load((space.root / "params.yaml").read_text())
        params["pretrain"].update(checkpoint_every=100, checkpoint_every_steps=2, log_every=1)
        space.write_params(params)
    checkpoint = resumed[0].root / "models" / "checkpoints" / "pretrain.pt"
    agents = static_agents(resumed, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and all(agent.poll() is None for agent in agents):
        if checkpoint.exists() and torch.load(checkpoint, weights_only=True)["step"] >= 2:
            break
        time.sleep(0.01)
    assert all(agent.poll() is None for agent in agents), "training ended before it could be interrupted"
    for agent in agents:
        os.killpg(agent.pid, signal.SIGKILL)
        agent.wait()
    assert torch.load(checkpoint, weights_only=True)["position"] > 0
    assert not (resumed[1].root / "models" / "checkpoints").exists(), "only rank 0 writes checkpoints"
    agents = static_agents(resumed)
    for agent in agents:
        _, stderr = agent.communicate(timeout=600)
        assert agent.returncode == 0, stderr[-3000:]
    c = weights(resumed[0])
    assert all(torch.allclose(a[k], c[k], atol=1e-4) for k in a), "the resumed two-node run diverged"


def static_agents(spaces: list[Workspace], **popen) -> list[subprocess.Popen]:
    """One torchrun agent per node with a fixed node rank (static rendezvous at node 0's address)."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
                              "--node-rank", str(rank), "--master-addr", "127.0.0.1", "--master-port", port,
                              "-m", "pipeline", "pretrain"], cwd=space.root,
                             env={**os.environ, "PYTHONPATH": str(ROOT), **space.env}, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True, **popen)
            for rank, space in enumerate(spaces)]
