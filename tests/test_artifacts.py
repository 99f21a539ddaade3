"""A stage's output folder is only ever the old one or the new one, whole."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.artifacts import swapped_in

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`


def written(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(folder.iterdir())}


def test_a_finished_block_replaces_the_old_output_whole(tmp_path: Path):
    final = tmp_path / "prepared"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with swapped_in(final) as partial:
        (partial / "new.txt").write_text("new")
        assert written(final) == {"old.txt": "old"}, "the old output stays readable while the new one is written"
    assert written(final) == {"new.txt": "new"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"], "no temporary sibling left"


def test_a_failed_block_leaves_the_old_output_and_no_temporary(tmp_path: Path):
    final = tmp_path / "prepared"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt):
        with swapped_in(final) as partial:
            (partial / "half.txt").write_text("half")
            raise KeyboardInterrupt
    assert written(final) == {"old.txt": "old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prepared"]


def test_stale_siblings_of_a_killed_run_are_cleared_and_a_first_output_is_made(tmp_path: Path):
    final = tmp_path / "ingested" / "synthetic"
    for stale in (".synthetic.partial", ".synthetic.old"):
        (final.parent / stale).mkdir(parents=True)
        (final.parent / stale / "leftover").write_text("x")
    with swapped_in(final) as partial:
        assert not any(partial.iterdir()), "a new run starts from an empty folder"
        (partial / "manifest.parquet").write_text("rows")
    assert sorted(p.name for p in final.parent.iterdir()) == ["synthetic"]
    assert written(final) == {"manifest.parquet": "rows"}
