"""The model registry side of governance: versions of the registered encoder with their evidence, the
release gate a CI/CD job calls, and tracing a consent withdrawal to every version it touches.

Each version's run carries governance/training_records.csv (record id, pixel sha256, source-file sha256 and
dataset of every training record of every dataset the model trained on), so a later withdrawal can be matched by
any of the three ids the withdrawals file accepts, whichever dataset it is in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import yaml

from pipeline import PipelineError
from pipeline.artifacts import Layout, read_json
from pipeline.contracts import Release, RunRecord, WithdrawnVersion
from pipeline.render import fmt
from pipeline.tracking import connect, lost_connection, md5, mlflow_error, silenced_stdout, tracking_uri

log = logging.getLogger(__name__)

RECORDS_ARTIFACT = "governance/training_records.csv"
SAMPLES_ARTIFACT = "eval/samples.parquet"  # logged by evaluate to the model's run
RELEASE_ARTIFACT = "governance/release.json"  # logged by log_report
PARAMS_ARTIFACT = "governance/params.yaml"  # the params file the report was written with
ID_COLUMNS = ("record_id", "sha256", "source_sha256")
FILES_TAG = "model.files_sha256"  # the version's tag: `files_digest` of the logged model's files at registration
PROGRAM = "data/model.pt2"  # the torch.export program of the logged encoder, the one file `load_encoder` loads


def _client():
    return connect().MlflowClient()


def lineage_of_run(run: RunRecord, train_paths: list[Path], root: Path) -> dict:
    """The run's git state (commit, dirty flag, changed paths) and data hashes, after checking that each training
    manifest on disk is the one the run trained on (so the record ids logged with the model are the right ones)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = _client().get_run(run.run_id).data.tags
    except MlflowException as exc:
        raise mlflow_error(f"run {run.run_id} of models/mae/run.json is not there", exc) from None
    for train_path in train_paths:
        key = f"dvc.md5.{train_path.relative_to(root).as_posix()}"
        if key in tags and (found := md5(train_path)) != tags[key]:
            raise PipelineError(f"{train_path}: md5 {found} differs from the {tags[key]} the model was "
                                "trained on; run `dvc repro` so model and data agree")
    hashes = {k.removeprefix("dvc.md5."): v for k, v in sorted(tags.items()) if k.startswith("dvc.md5.")}
    hashes.update({k: v for k, v in sorted(tags.items()) if k.startswith("data.") and k.endswith("sha256")})
    return {"git.commit": tags.get("git.commit", "unknown"), "git.dirty": tags.get("git.dirty", "unknown"),
            "git.changed_paths": tags.get("git.changed_paths", ""), "hashes": hashes}


def register_version(name: str, run: RunRecord, decision: str, files: dict[str, str]) -> str:
    """The registered version of this run's encoder: created once, found again when the report re-runs. `files`
    (the logged model's files -> SHA-256) is recorded with it, as the tag FILES_TAG."""
    from mlflow.exceptions import MlflowException

    if not run.model_uri:
        raise PipelineError("models/mae/run.json: no model_uri (written by an older pretrain); "
                            "run `dvc repro pretrain`")
    client = _client()
    try:
        existing = client.search_model_versions(f"name='{name}' and run_id='{run.run_id}'")
        if existing:
            return str(max(int(v.version) for v in existing))
        try:
            client.get_registered_model(name)
        except MlflowException:
            client.create_registered_model(name, description="MAE ViT encoders with their governance evidence: "
                                                             "report, release decision and training record ids.")
        version = client.create_model_version(name, source=run.model_uri, run_id=run.run_id,
                                              tags={"release.decision": decision, FILES_TAG: files_digest(files)},
                                              model_id=run.model_uri.removeprefix("models:/"))
    except MlflowException as exc:
        raise mlflow_error(f"cannot register {name}", exc) from None
    log.info("registered %s version %s (run %s)", name, version.version, run.run_id)
    return str(version.version)


def log_report(name: str, version: str, run: RunRecord, folder: Path, release: Release) -> None:
    """Report beside the model: artifacts on its run, decision and evidence as version tags, aliases.
    `release` is what the report wrote to release.json. With report.require_signoff, only sign-offs that still
    hold against this report keep (or put) the alias `approved` on the version (pipeline.review)."""
    from mlflow.exceptions import MlflowException

    from pipeline.report.changes import summary as changes_summary
    from pipeline.review.store import set_review_tags

    client = _client()
    statuses = {f"release.area.{area}": entry.status for area, entry in release.areas.items()}
    try:
        model_id = run.model_uri.removeprefix("models:/")
        with silenced_stdout():
            client.log_artifacts(run.run_id, str(folder), "governance")
            # inside the logged model too, so downloading models:/<name>@<alias> brings its report along
            client.log_model_artifacts(model_id, str(folder), "governance")
        client.set_tag(run.run_id, "release.decision", release.decision)
        client.set_logged_model_tags(model_id, {"release.decision": release.decision})
        tags = {"release.decision": release.decision, "release.blocked_by": ", ".join(release.blocked_by)[:5000],
                "release.report": "governance/report.html", "training_records": RECORDS_ARTIFACT, **statuses}
        tags.update({f"data.{k}": v for k, v in release.data_hashes.items()})
        tags.update({"git.commit": release.model.git_commit, "git.dirty": release.model.git_dirty,
                     FILES_TAG: files_digest(release.model.files)})
        if release.model.git_changed_paths:
            tags["git.changed_paths"] = release.model.git_changed_paths
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, value)
        review = release.review
        delta = "" if release.changes is None else f" {changes_summary(release.changes)}"
        client.update_model_version(name, version, description=f"Automated outcome {release.decision}: "
                                    f"{len(release.blocked_by)} blocking checks; sign-off: {review.state}.{delta} "
                                    f"Governance report: run {run.run_id}, artifacts governance/report.html")
        client.set_registered_model_alias(name, "candidate", version)
        if not review.required:  # the automatic path: no human signs, the gate's outcome moves the alias
            client.set_model_version_tag(name, version, "review.state", "not required: no human signed")
            if release.decision == "eligible":
                client.set_registered_model_alias(name, "approved", version)
            elif _alias_version(client, name, "approved") == version:
                client.delete_registered_model_alias(name, "approved")
        else:
            set_review_tags(client, release, review)
    except MlflowException as exc:
        raise mlflow_error(f"cannot record the report on {name} version {version}", exc) from None


def reconcile(layout: Layout) -> Release:
    """The registry brought to what reports/governance says: the version of the model's run registered, its tags,
    description and aliases, and the governance artifacts on its run and logged model, as `report` left them.
    Idempotent. DVC runs it after every report (stage `registry`, always changed), so a report stopped after it
    registered the version, or a report DVC restored from its run cache, still leaves a complete registry."""
    release, run = layout.release(), layout.run()
    facts = release.model
    if run.tracking_uri and run.tracking_uri != tracking_uri():
        # a pulled clone with its own store: the model's registry is the one it was tracked in
        log.warning("%s: the model was tracked at %s, not at %s; nothing to reconcile here (point "
                    "MLFLOW_TRACKING_URI at that store to reconcile it)", layout.run_file, run.tracking_uri,
                    tracking_uri())
        return release
    if facts.run_id != run.run_id:
        raise PipelineError(f"{layout.release_file}: describes run {facts.run_id}, but {layout.run_file} holds run "
                            f"{run.run_id}; run `dvc repro report`")
    version = register_version(facts.registered_model, run, release.decision, facts.files)
    if version != facts.version:
        raise PipelineError(f"{layout.release_file}: describes {facts.registered_model} version {facts.version}, "
                            f"but the registry holds run {run.run_id} as version {version}; run `dvc repro report`")
    log_report(facts.registered_model, version, run, layout.governance, release)
    log.info("%s version %s: tags, aliases, description and governance artifacts as %s says", facts.registered_model,
             version, layout.release_file)
    return release


def files_digest(files: dict[str, str]) -> str:
    """One SHA-256 for a model's file listing (path -> SHA-256): the version tag model.files_sha256."""
    return hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def load_encoder(name: str, version: str | None = None, alias: str = "candidate"):
    """The registered encoder as a module that maps normalised images to features, loaded so that loading cannot
    run code: the logged model's files are checked against the digests the report recorded when it registered
    the version (release.json on the version's run, and its tag model.files_sha256), and only the pt2 program
    loads, with MLflow's pickle deserialisation off. A swapped or added file is refused in one line."""
    from mlflow.exceptions import MlflowException

    from pipeline.review.store import model_files

    mlflow = connect()
    client = mlflow.MlflowClient()
    try:
        found = client.get_model_version(name, version) if version else client.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        raise mlflow_error(f"cannot find {name} {'version ' + version if version else '@' + alias}", exc) from None
    where = f"{name} version {found.version}"
    recorded_digest = found.tags.get(FILES_TAG)
    if not recorded_digest:
        raise PipelineError(f"{where}: no {FILES_TAG} tag (registered by a report that recorded no model digests); "
                            "run `dvc repro report` to record them")
    with tempfile.TemporaryDirectory() as tmp, silenced_stdout():
        try:
            release = read_json(Path(mlflow.artifacts.download_artifacts(
                run_id=found.run_id, artifact_path=RELEASE_ARTIFACT, dst_path=f"{tmp}/release")), Release)
            root = Path(mlflow.artifacts.download_artifacts(artifact_uri=found.source, dst_path=f"{tmp}/model"))
        except (MlflowException, OSError) as exc:
            raise mlflow_error(f"cannot download the files of {where}", exc) from None
        recorded = release.model.files
        if files_digest(recorded) != recorded_digest:
            raise PipelineError(f"{where}: {RELEASE_ARTIFACT} on run {found.run_id} lists other model files than "
                                f"the version's tag {FILES_TAG} records; refusing to load")
        files = model_files(root)
        for path in sorted(recorded.keys() | files.keys()):
            if recorded.get(path) != files.get(path):
                state = "added" if path not in recorded else "missing" if path not in files else "changed"
                raise PipelineError(f"{found.source}/{path}: {state} since registration (sha256 recorded: "
                                    f"{recorded.get(path, 'none')}); refusing to load {where}")
        if PROGRAM not in files:
            raise PipelineError(f"{found.source}: no {PROGRAM} (a pickled model?); only the pt2 program loads")
        previous = os.environ.get("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
        os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
        try:
            return mlflow.pytorch.load_model(str(root), device="cpu")
        except MlflowException as exc:
            raise mlflow_error(f"cannot load {where}", exc) from None
        finally:
            if previous is None:
                os.environ.pop("MLFLOW_ALLOW_PICKLE_DESERIALIZATION")
            else:
                os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = previous


def _alias_version(client, name: str, alias: str) -> str | None:
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


@dataclass(frozen=True)
class Approved:
    """The version a candidate is compared with, and what its run recorded: the per-sample table of its
    evaluation, its release (the audits' checks), its training records and the params that produced it; None where
    the run lacks one, with `missing` saying why."""

    version: str
    run_id: str
    samples: pd.DataFrame | None
    release: Release | None
    missing: list[str]
    records: pd.DataFrame | None = None
    params: dict | None = None

    def lacks(self, artifact: str) -> str:
        """Why `artifact` is missing from the approved run, as `missing` recorded it."""
        return "; ".join(m for m in self.missing if m.startswith(artifact)) or artifact


def _read_artifact(artifact: str, path: Path):
    if artifact == SAMPLES_ARTIFACT:
        return pd.read_parquet(path)
    if artifact == RECORDS_ARTIFACT:
        return pd.read_csv(path, dtype=str, keep_default_na=False)
    if artifact == PARAMS_ARTIFACT:
        found = yaml.safe_load(path.read_text())
        if not isinstance(found, dict):
            raise ValueError(f"{artifact} is not a mapping")
        return found
    return Release.model_validate_json(path.read_text())


def approved_version(name: str) -> Approved | None:
    """The version under alias `approved` of `name` with its run's evidence; None when there is none (no such
    registered model, or no version approved)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        version = client.get_model_version_by_alias(name, "approved")
    except MlflowException as exc:
        if lost_connection(exc):
            raise mlflow_error(f"cannot read alias approved of {name}", exc) from None
        return None
    found, missing = {}, []
    for artifact in (SAMPLES_ARTIFACT, RELEASE_ARTIFACT, RECORDS_ARTIFACT, PARAMS_ARTIFACT):
        try:
            with tempfile.TemporaryDirectory() as tmp, silenced_stdout():
                path = Path(mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=artifact,
                                                                dst_path=tmp))
                found[artifact] = _read_artifact(artifact, path)
        except (MlflowException, OSError, ValueError, yaml.YAMLError) as exc:
            if lost_connection(exc):
                raise mlflow_error(f"cannot download {artifact} of {name} version {version.version}", exc) from None
            missing.append(f"{artifact} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})")
    return Approved(version=str(version.version), run_id=version.run_id, samples=found.get(SAMPLES_ARTIFACT),
                    release=found.get(RELEASE_ARTIFACT), missing=missing, records=found.get(RECORDS_ARTIFACT),
                    params=found.get(PARAMS_ARTIFACT))


# ---------------------------------------------------------------- release gate

def release_gate(release_file: Path, run_file: Path) -> tuple[Release | None, list[str]]:
    """(the release when it was written for the current model, else None; lines to print): the blocking checks."""
    release = read_json(release_file, Release)
    current = read_json(run_file, RunRecord).run_id
    if release.model.run_id != current:
        return None, [f"stale: {release_file} was written for run {release.model.run_id}, the current model "
                      f"is run {current}; run `dvc repro`"]
    checks = {c.id: c for c in release.checks}
    lines = []
    for check_id in release.blocked_by:
        c = checks[check_id]
        interval = f" interval {fmt(c.interval)}" if c.interval else ""
        lines.append(f"{check_id}: {c.status} ({c.statistic} {fmt(c.value)}{interval}, threshold {c.threshold}; "
                     f"{c.detail})")
    return release, lines


# ---------------------------------------------------------------- consent withdrawal

def affected(records: pd.DataFrame, withdrawn: frozenset[str]) -> list[str]:
    """The records (any id column) that the withdrawals list, as `<dataset>/<record id>` where the records name their
    dataset (a model trained on several), else as record ids."""
    named = records["dataset"] + "/" + records["record_id"] if "dataset" in records else records["record_id"]
    hits = set()
    for column in ID_COLUMNS:
        if column in records:
            hits.update(named[records[column].isin(withdrawn)])
    return sorted(hits)


def consent_check(name: str, withdrawn: frozenset[str], withdrawals_file: str) -> list[dict]:
    """Every registered version of `name` with the withdrawn records it was trained on; affected versions are
    tagged consent.status=withdrawn_records and consent.withdrawn_records=<count>."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = _client()
    try:
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        raise mlflow_error(f"cannot list versions of {name}", exc) from None
    findings = []
    for version in sorted(versions, key=lambda v: int(v.version)):
        entry = {"version": str(version.version), "run_id": version.run_id, "records": None, "withdrawn": []}
        try:
            with tempfile.TemporaryDirectory() as tmp, silenced_stdout():
                path = mlflow.artifacts.download_artifacts(run_id=version.run_id, artifact_path=RECORDS_ARTIFACT,
                                                           dst_path=tmp)
                records = pd.read_csv(path, dtype=str)
        except (MlflowException, OSError) as exc:
            if lost_connection(exc):
                raise mlflow_error(f"cannot download {RECORDS_ARTIFACT} of version {version.version}", exc) from None
            entry["error"] = f"no training records ({str(exc).splitlines()[0]})"
            findings.append(entry)
            continue
        entry["records"] = len(records)
        entry["withdrawn"] = affected(records, withdrawn)
        if entry["withdrawn"]:
            client.set_model_version_tag(name, version.version, "consent.status", "withdrawn_records")
            client.set_model_version_tag(name, version.version, "consent.withdrawn_records",
                                         str(len(entry["withdrawn"])))
            client.set_model_version_tag(name, version.version, "consent.withdrawals_file", withdrawals_file)
        findings.append(entry)
    return findings


def withdrawn_versions(name: str, withdrawn: frozenset[str], withdrawals_file: str,
                       current: str) -> list[WithdrawnVersion]:
    """The registered versions other than `current` trained on withdrawn records, tagged as consent-check tags
    them: what the report of a retrained model names, so the withdrawal's reach is on the page that releases it."""
    if not withdrawn:
        return []
    return [WithdrawnVersion(version=found["version"], run_id=found["run_id"], records=found["withdrawn"])
            for found in consent_check(name, withdrawn, withdrawals_file)
            if found["withdrawn"] and found["version"] != current]
