"""MLflow: where runs go, the lineage tags every model carries, and a quiet terminal.

Tracking URI: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db at the repository root (MLflow 3 refuses
the plain file store). The run a model was trained in is handed to later stages in models/mae/run.json.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import subprocess
import warnings
from pathlib import Path

RUN_FILE = Path("models/mae/run.json")


def quiet() -> None:
    """Keep MLflow's telemetry, progress bars, URL prints and known deprecation noise off the terminal."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"mlflow\..*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"mlflow\..*")
    warnings.filterwarnings("ignore", message=r".*pkg_resources.*")
    # known, harmless: dataset-source resolution ambiguity and schema-inference hints for integer columns
    warnings.filterwarnings("ignore", category=UserWarning, module=r"mlflow\..*")


@contextlib.contextmanager
def silenced_stdout():
    """MLflow prints run URLs to stdout when the store is a server; the log says where the run is."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


def tracking_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def md5(path: Path) -> str:
    """The hash DVC records for a file, so a tag can be matched against dvc.lock."""
    digest = hashlib.md5()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_state() -> dict[str, str]:
    def git(*args: str) -> str | None:
        try:
            return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git.commit": commit or "unknown", "git.dirty": "unknown" if status is None else str(bool(status)).lower()}


def lineage_tags(inputs: list[Path], provenance_files: list[Path]) -> dict[str, str]:
    """Git commit and dirty flag, the DVC (md5) hash of every input, and each dataset's card digest."""
    tags = git_state()
    for path in inputs:
        tags[f"dvc.md5.{path.as_posix()}"] = md5(path)
    for path in provenance_files:
        provenance = json.loads(path.read_text())
        name = provenance["dataset"]
        tags[f"data.{name}.card_sha256"] = provenance["card"]["sha256"]
        tags[f"data.{name}.source_sha256"] = provenance["source"]["sha256"]
        tags[f"data.{name}.accepted"] = str(provenance["counts"]["accepted"])
    return tags


def write_run_file(run, model_uri: str, path: Path = RUN_FILE) -> None:
    """The run and the logged encoder (`models:/<id>`) that the report stage registers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"run_id": run.info.run_id, "experiment_id": run.info.experiment_id,
                                "model_uri": model_uri, "tracking_uri": tracking_uri()}, indent=2) + "\n")


@contextlib.contextmanager
def model_run(run_file: Path = RUN_FILE):
    """Reopen the MLflow run that trained the model, so a later stage logs its evidence beside the model."""
    from pipeline import PipelineError

    quiet()
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        run_id = json.loads(run_file.read_text())["run_id"]
    except (OSError, ValueError, KeyError) as exc:
        raise PipelineError(f"{run_file}: cannot read the model's MLflow run id ({exc}); run `dvc repro pretrain`") \
            from None
    mlflow.set_tracking_uri(tracking_uri())
    try:
        with silenced_stdout():
            mlflow.start_run(run_id=run_id)
    except MlflowException as exc:
        raise PipelineError(f"{run_file}: MLflow run {run_id} is not in {tracking_uri()} "
                            f"({str(exc).splitlines()[0]})") from None
    try:
        yield mlflow
    finally:
        with silenced_stdout():
            mlflow.end_run()
