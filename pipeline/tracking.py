"""MLflow: where runs go, whether the server there answers, the lineage tags every model carries, and a quiet
terminal.

Tracking URI: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db at the repository root (MLflow 3 refuses
the plain file store). The run a model was trained in is handed to later stages in models/mae/run.json.
Every stage opens MLflow through connect(), and the command line runs those stages inside reachable(), so
a tracking server that does not answer ends any of them within seconds with one line naming its URI.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import os
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
import warnings
from pathlib import Path

from pipeline import PipelineError
from pipeline.artifacts import read_json, write_json
from pipeline.contracts import Provenance, RunRecord

log = logging.getLogger(__name__)
HEALTH_TIMEOUT_S = 5
# the cheapest read of the tracking store (a 404 when the experiment is gone still proves the store answers)
STORE_PROBE = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
# MLflow retries a failed request 7 times with backoff factor 2 and a 120 s timeout (about 4 minutes of
# retries on a closed port); a few short retries ride out a server restart without hiding a dead server.
HTTP_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}
# rewritten by every `dvc repro` / `dvc plots show`: the pipeline's own bookkeeping, not a change to the code
BOOKKEEPING = (":(top,exclude,glob)**/dvc.lock", ":(top,exclude)dvc_plots")
CHANGED_PATHS_CHARS = 1000


def quiet() -> None:
    """Keep MLflow's telemetry, progress bars, URL prints and known deprecation noise off the terminal."""
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("MLFLOW_CONFIGURE_LOGGING", "false")
    for name in ("mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # a retry's warning is a long line per attempt; a connection that stays lost ends the stage with one line
    logging.getLogger("urllib3").setLevel(logging.ERROR)
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


def first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__


def unreachable(uri: str, reason: str) -> PipelineError:
    return PipelineError(f"MLflow tracking server {uri} is unreachable ({reason}); start it or point "
                         "MLFLOW_TRACKING_URI at a running one")


def probe(uri: str, path: str, store: bool = False) -> None:
    """GET <uri><path> within HEALTH_TIMEOUT_S. A failure to connect or to answer in time means unreachable, and so
    does a server error on a read of the store; any other HTTP error (an auth wall) or a certificate MLflow may be
    configured to accept is left to MLflow."""
    said = "its tracking store: " if store else ""
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}{path}", timeout=HEALTH_TIMEOUT_S):
            pass
    except urllib.error.HTTPError as exc:
        if store and exc.code >= 500:
            raise unreachable(uri, f"{said}HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        if not isinstance(exc.reason, ssl.SSLError):
            raise unreachable(uri, f"{said}{exc.reason}") from None
    except OSError as exc:  # a timeout, or a connection reset before the answer
        raise unreachable(uri, f"{said}{first_line(exc)}") from None


@functools.cache
def check_server(uri: str) -> None:
    """Once per process: the server's /health, then one read of its tracking store. /health does not touch the
    store, and a server whose database is down answers it yet holds every API request while it reconnects, which
    MLflow's own timeout and retries would wait out for minutes."""
    if not uri.startswith(("http://", "https://")):
        return
    probe(uri, "/health")
    probe(uri, STORE_PROBE, store=True)


def connect():
    """The mlflow module pointed at the tracking URI, once the server there answers, with bounded retries."""
    quiet()
    for name, value in HTTP_RETRIES.items():
        os.environ.setdefault(name, value)
    uri = tracking_uri()
    check_server(uri)
    import mlflow

    mlflow.set_tracking_uri(uri)
    if not os.environ.get("MLFLOW_TRACKING_URI"):
        check_local_store(uri)
    return mlflow


@functools.cache
def check_local_store(uri: str) -> None:
    """Once per process, for the workspace's own store (the default sqlite:///…/mlflow.db): every experiment keeps
    its artifacts inside the workspace. The store records absolute artifact locations, so a copied or moved
    workspace would write its runs and models into the original's folder."""
    if not uri.startswith("sqlite:///"):
        return
    database = Path(uri.removeprefix("sqlite:///"))
    if not database.is_file():
        return
    import urllib.parse

    from mlflow import MlflowClient

    home = database.resolve().parent
    for experiment in MlflowClient(uri).search_experiments(view_type=3):  # active and deleted
        location = experiment.artifact_location
        parsed = urllib.parse.urlparse(location)
        if parsed.scheme not in ("", "file"):
            continue
        folder = Path(urllib.parse.unquote(parsed.path)).resolve()
        if folder != home and home not in folder.parents:
            raise PipelineError(f"{database}: experiment {experiment.name!r} keeps its artifacts in {folder}, "
                                f"outside this workspace {home} (a copied or moved workspace?); move mlflow.db "
                                "with its artifact folders, or point MLFLOW_TRACKING_URI at the original store")


def lost_connection(exc: BaseException | None) -> bool:
    """Whether a failure comes from the connection to the server (MLflow wraps requests' errors in its own)."""
    import requests

    while exc is not None:
        if isinstance(exc, (requests.ConnectionError, requests.Timeout)) \
                and not isinstance(exc, requests.exceptions.SSLError):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def mlflow_error(what: str, exc: Exception) -> PipelineError:
    """One line for a failed MLflow call: "unreachable" when the connection failed, else what failed."""
    if lost_connection(exc):
        return unreachable(tracking_uri(), first_line(exc))
    return PipelineError(f"MLflow at {tracking_uri()}: {what} ({first_line(exc)})")


@contextlib.contextmanager
def reachable():
    """Around a whole stage: fail before any work when the server does not answer, and read a connection
    lost later (the server stopped mid-stage) as the same one line."""
    check_server(tracking_uri())
    try:
        yield
    except PipelineError:
        raise
    except Exception as exc:
        if lost_connection(exc):
            raise unreachable(tracking_uri(), first_line(exc)) from None
        raise


def md5(path: Path) -> str:
    """The hash DVC records for a file, so a tag can be matched against dvc.lock. Read once per file version (path,
    size, modification time), as DVC's own state does: a stage hashes its inputs for several records (the checkpoint
    fingerprint, the MLflow inputs, the lineage tags), and a real training split is tens of GB."""
    stat = path.stat()
    return _md5(str(path.resolve()), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=256)
def _md5(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def changed_paths_tag(paths: list[str]) -> str:
    """The changed paths, comma-separated, cut at a sensible length with how many were left out."""
    shown: list[str] = []
    for path in paths:
        if sum(len(p) + 2 for p in shown) + len(path) > CHANGED_PATHS_CHARS:
            break
        shown.append(path)
    rest = len(paths) - len(shown)
    return ", ".join(shown) + (f" (+{rest} more)" if rest else "")


def git(*args: str) -> str | None:
    """git's output in the working directory's repository; None when there is none or git refuses."""
    try:
        return subprocess.run(["git", *args], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def commits_between(older: str, newer: str) -> list[str] | None:
    """`<short hash> <subject>` of each commit after `older` up to `newer`, oldest first; None when either commit
    is unknown to this repository (a shallow clone, another repository, "unknown")."""
    found = git("log", "--reverse", "--format=%h %s", f"{older}..{newer}", "--")
    return None if found is None else found.splitlines()


def git_state() -> dict[str, str]:
    """The commit, and whether the working tree differs from it, naming the paths that do. Ignored files (DVC
    outputs among them) and DVC's own bookkeeping do not count, so a pristine checkout that ran the pipeline
    stays clean; untracked files that are not ignored do, since a new module changes what trains."""
    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "-z", "--no-renames", "--", *BOOKKEEPING)
    if status is None:
        return {"git.commit": (commit or "unknown").strip(), "git.dirty": "unknown"}
    paths = sorted(entry[3:] for entry in status.split("\0") if entry)
    tags = {"git.commit": (commit or "unknown").strip(), "git.dirty": str(bool(paths)).lower()}
    if paths:
        tags["git.changed_paths"] = changed_paths_tag(paths)
    return tags


def lineage_tags(inputs: list[Path], provenances: list[Provenance]) -> dict[str, str]:
    """Git commit, dirty flag and changed paths, the DVC (md5) hash of every input, and each dataset's card
    digest."""
    tags = git_state()
    for path in inputs:
        tags[f"dvc.md5.{path.as_posix()}"] = md5(path)
    for provenance in provenances:
        name = provenance.dataset
        tags[f"data.{name}.card_sha256"] = provenance.card.sha256
        tags[f"data.{name}.source_sha256"] = provenance.source.sha256
        tags[f"data.{name}.accepted"] = str(provenance.counts.accepted)
    return tags


def workspace(root: Path) -> str:
    """The machine and folder a stage runs in (the `pipeline.workspace` tag), so a later run can tell its own
    orphans from another workspace's live runs on a shared server."""
    return f"{socket.gethostname()}:{Path(root).resolve()}"


def close_orphans(client, experiment_id: str, where: str) -> list[str]:
    """End KILLED the runs of this experiment and workspace that are still RUNNING: a process that died, or whose
    server went away, before it could end its run leaves one RUNNING forever (a live one is impossible here: DVC
    runs one stage of a workspace at a time). Returns their ids."""
    closed = []
    for run in client.search_runs([experiment_id], filter_string="attributes.status = 'RUNNING'"):
        if run.data.tags.get("pipeline.workspace") == where:
            client.set_tag(run.info.run_id, "pipeline.ended_by", "a later run in the same workspace")
            client.set_terminated(run.info.run_id, status="KILLED")
            closed.append(run.info.run_id)
    if closed:
        log.warning("ended KILLED %d run(s) a stopped run left RUNNING in %s: %s", len(closed), where,
                    ", ".join(closed))
    return closed


class StepMetrics:
    """Log each (metric, step) of a run at most once, so a resumed run does not log again the steps it
    re-lives after its last checkpoint.

    Why not buffer until a checkpoint is written: logging and checkpointing cannot be made one atomic act,
    so a kill between the two either loses steps or logs them twice. Asking MLflow on resume which steps it
    already holds is exact at any kill point: each log_metrics call is one batch, stored whole or not at
    all, and training is deterministic, so a re-lived step has the very value that was logged before."""

    def __init__(self, mlflow):
        self.mlflow = mlflow
        self.logged: set[tuple[str, int]] = set()

    def resume(self, run_id: str) -> None:
        """Learn every (metric, step) the run already holds."""
        client = self.mlflow.MlflowClient()
        for key in client.get_run(run_id).data.metrics:
            self.logged.update((key, m.step) for m in client.get_metric_history(run_id, key))

    def log(self, values: dict[str, float], step: int) -> None:
        new = {key: value for key, value in values.items() if (key, step) not in self.logged}
        if new:
            self.mlflow.log_metrics(new, step=step)
            self.logged.update((key, step) for key in new)


def write_run_file(run, model_uri: str, path: Path) -> None:
    """The run and the logged encoder (`models:/<id>`) that the report stage registers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, RunRecord(run_id=run.info.run_id, experiment_id=run.info.experiment_id, model_uri=model_uri,
                               tracking_uri=tracking_uri()))


@contextlib.contextmanager
def ended_on_failure(mlflow):
    """A run stopped by an error is recorded FAILED (KILLED on Ctrl-C): otherwise MLflow's exit hook closes it
    FINISHED, and a run that diverged looks like one that trained."""
    try:
        yield
    except BaseException as exc:
        if mlflow is not None and mlflow.active_run() is not None:
            try:
                with silenced_stdout():
                    mlflow.end_run(status="KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
            except Exception:  # an unreachable store: the error that stopped the run is the one to show
                log.debug("could not mark the run as ended", exc_info=True)
        raise


@contextlib.contextmanager
def model_run(run_file: Path):
    """Reopen the MLflow run that trained the model, so a later stage logs its evidence beside the model."""
    run_id = read_json(run_file, RunRecord).run_id
    mlflow = connect()
    from mlflow.exceptions import MlflowException

    try:
        with silenced_stdout():
            mlflow.start_run(run_id=run_id)
    except MlflowException as exc:
        raise mlflow_error(f"run {run_id} of {run_file} is not there", exc) from None
    try:
        yield mlflow
    finally:
        with silenced_stdout():
            mlflow.end_run()
