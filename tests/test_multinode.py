"""Multi-node training through the code path README's "Scaling out" documents: two torchrun agents, one per
"machine", meet at a c10d rendezvous and train the model a single process trains with the same global batch."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

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
    params = yaml.safe_load((evaluated.root / "params.yaml").read_text())
    params["pretrain"].update(TRAINING, batch_size=batch_size)
    space.write_params(params)
    return space


def weights(space: Workspace) -> dict[str, torch.Tensor]:
    return torch.load(space.root / "models" / "mae" / "model.pt", weights_only=True)


def test_two_nodes_at_a_c10d_rendezvous_train_what_one_process_trains_with_the_same_global_batch(
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
    run = json.loads((main.root / "models" / "mae" / "run.json").read_text())
    assert run["run_id"]
    a, b = weights(single), weights(main)
    assert a.keys() == b.keys()
    assert all(torch.allclose(a[k], b[k], atol=1e-4) for k in a), "two nodes diverged from the single-process run"
