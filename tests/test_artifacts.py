"""A stage's outputs are only ever the old set or the new one, whole, and a reader refuses anything else."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import PipelineError
from pipeline.artifacts import SEAL, Layout, rewritten, sealed, written_whole

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`


def written(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.name != SEAL}


def test_a_finished_block_replaces_the_old_output_whole(tmp_path: Path):
    final = tmp_path / "prepared"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with written_whole(final, root=tmp_path) as staged:
        (staged(final) / "new.txt").write_text("new")
        assert written(final) == {"old.txt": "old"}, "the old output stays readable while the new one is written"
    assert written(final) == {"new.txt": "new"}
    assert json.loads((final / SEAL).read_text()) == {"beside": {}, "files": {"new.txt": 3}}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"], "no temporary sibling left"


def test_a_failed_block_leaves_the_old_outputs_and_no_temporary(tmp_path: Path):
    final, metrics = tmp_path / "eval", tmp_path / "metrics" / "eval.json"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with written_whole(final, metrics, root=tmp_path) as staged:
            (staged(final) / "half.txt").write_text("half")
            staged(metrics).write_text("{}")
            raise KeyboardInterrupt
    assert written(final) == {"old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "metrics"]
    assert not any((tmp_path / "metrics").iterdir())


def test_stale_siblings_of_a_killed_run_are_cleared_and_a_first_output_is_made(tmp_path: Path):
    final = tmp_path / "ingested" / "synthetic"
    for stale in (".synthetic.partial", ".synthetic.old"):
        (final.parent / stale).mkdir(parents=True)
        (final.parent / stale / "leftover").write_text("x")
    with written_whole(final, root=tmp_path) as staged:
        assert not any(staged(final).iterdir()), "a new run starts from an empty folder"
        (staged(final) / "manifest.parquet").write_text("rows")
    assert sorted(p.name for p in final.parent.iterdir()) == ["synthetic"]
    assert written(final) == {"manifest.parquet": "rows"}


def evaluated(root: Path, metrics: str = '{"mse": 1}') -> Layout:
    """An evaluate-shaped output: a folder, a metrics file and a figures folder beside it."""
    layout = Layout(root)
    with layout.writing(layout.eval, "metrics/eval.json", "reports/eval") as staged:
        staged(layout.samples_file).write_text("samples")
        staged(layout.eval_metrics_file).write_text(metrics)
        (staged(layout.eval_figures) / "grid.png").write_text("png")
        assert staged(layout.eval_metrics_file).name == "eval.json", "a file keeps its name while it is written"
    return layout


def test_files_beside_the_folder_are_swapped_in_and_recorded_by_digest(tmp_path: Path):
    layout = evaluated(tmp_path)
    record = json.loads((layout.eval / SEAL).read_text())
    assert sorted(record["beside"]) == ["metrics/eval.json", "reports/eval/grid.png"]
    assert record["files"] == {"samples.parquet": 7}
    assert layout.sealed(layout.eval_metrics_file) == layout.eval_metrics_file
    assert layout.sealed(layout.samples_file) == layout.samples_file
    assert sorted(p.name for p in (tmp_path / "metrics").iterdir()) == ["eval.json"]


def test_a_run_stopped_between_its_swaps_is_refused_by_the_reader(tmp_path: Path):
    """What a kill after the files beside were swapped and before the folder was leaves: new metrics, old folder."""
    layout = evaluated(tmp_path)
    layout.eval_metrics_file.write_text('{"mse": 2}')
    with pytest.raises(PipelineError, match=r"metrics/eval.json: does not match .*complete.json.*dvc repro evaluate"):
        layout.sealed(layout.eval_metrics_file)


def test_a_file_changed_or_missing_inside_the_folder_is_refused(tmp_path: Path):
    layout = evaluated(tmp_path)
    layout.samples_file.write_text("half")
    with pytest.raises(PipelineError, match=r"samples.parquet: not the file .* records \(7 bytes recorded, 4 bytes"):
        layout.sealed(layout.samples_file)
    (layout.eval / "extra.npy").write_text("x")
    with pytest.raises(PipelineError, match=r"extra.npy: not the file .* \(none recorded, 1 bytes found\)"):
        layout.sealed(layout.eval)


def test_a_folder_without_its_record_is_incomplete_and_a_missing_one_not_found(tmp_path: Path):
    layout = evaluated(tmp_path)
    (layout.eval / SEAL).unlink()
    with pytest.raises(PipelineError, match=r"data/eval: incomplete \(no complete.json.*run `dvc repro evaluate`"):
        layout.samples()
    with pytest.raises(PipelineError, match=r"data/eval/samples.parquet: not found; run `dvc repro evaluate`"):
        Layout(tmp_path / "empty").samples()


def test_a_rewritten_folder_keeps_its_record_true(tmp_path: Path):
    final = tmp_path / "governance"
    with written_whole(final, root=tmp_path) as staged:
        (staged(final) / "report.md").write_text("signed by nobody")
    with rewritten(final) as copy:
        (copy / "report.md").write_text("signed by Ada Lovelace")
        assert (final / "report.md").read_text() == "signed by nobody"
    assert sealed(final / "report.md", final) == final / "report.md"
    assert written(final) == {"report.md": "signed by Ada Lovelace"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["governance"]
