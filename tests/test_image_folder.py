"""Bringing your own images: every kind of bad input is quarantined with its reason, the rest ingests."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from pipeline.artifacts import Layout
from pipeline.policy import load_withdrawals
from pipeline.sources.records import ImageProblem, decode
from pipeline.validate import case_twins
from tests.conftest import ROOT, Workspace, small_params

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`

GOOD = {"photographer": "alice", "taken_at": "2025-03-01T10:00:00", "license": "CC-BY-4.0",
        "consent": "granted", "camera": "phone", "age_band": "under_30", "label": "indoor"}


def gradient(mode_size=(40, 30)) -> np.ndarray:
    w, h = mode_size
    y, x = np.mgrid[0:h, 0:w]
    return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)


def build_folder(folder: Path) -> None:
    """Files and metadata rows covering every input case the test expects."""
    folder.mkdir(parents=True)
    rgb = Image.fromarray(gradient())
    rows: list[dict] = []

    def add(record_id: str, path: str, **changes):
        rows.append({"record_id": record_id, "path": path, **GOOD, **changes})

    rgb.save(folder / "rgb.png"); add("rgb", "rgb.png")
    rgb.save(folder / "photo.jpg", quality=90); add("jpeg", "photo.jpg")
    Image.fromarray(gradient()[:, :, 0].astype(np.uint16) * 257).save(folder / "deep.png"); add("16bit", "deep.png")
    rgb.convert("P", palette=Image.Palette.ADAPTIVE).save(folder / "palette.png"); add("palette", "palette.png")
    rgba = rgb.copy(); rgba.putalpha(128); rgba.save(folder / "alpha.png"); add("rgba", "alpha.png")
    rgb.convert("L").save(folder / "grey.png"); add("grey", "grey.png")
    rgb.convert("1").save(folder / "bits.png"); add("1bit", "bits.png")
    rgb.convert("CMYK").save(folder / "cmyk.jpg"); add("cmyk", "cmyk.jpg")
    (folder / "sub").mkdir(); rgb.rotate(90).save(folder / "sub" / "nested.webp"); add("nested", "sub/nested.webp")

    (folder / "empty.png").write_bytes(b""); add("zero", "empty.png")
    (folder / "notes.png").write_text("this is not an image"); add("text", "notes.png")
    data = (folder / "rgb.png").read_bytes()
    (folder / "cut.png").write_bytes(data[: len(data) // 2]); add("truncated", "cut.png")
    corrupt = bytearray(data); corrupt[60:120] = b"\x00" * 60
    (folder / "corrupt.png").write_bytes(bytes(corrupt)); add("corrupt", "corrupt.png")
    Image.new("L", (400, 400)).save(folder / "bomb.png"); add("bomb", "bomb.png")
    shutil.copy(folder / "rgb.png", folder / "copy.png"); add("copy", "copy.png")
    (folder.parent / "outside.png").write_bytes(data)
    add("escape", "../outside.png")
    add("absolute", str(folder.parent / "outside.png"))
    (folder / "link.png").symlink_to(folder.parent / "outside.png"); add("symlink", "link.png")
    add("ghost", "missing.png")
    rgb.rotate(5).save(folder / "again.png"); add("rgb", "again.png")  # a record id used twice
    rgb.rotate(180).save(folder / "when.png"); add("when", "when.png", taken_at="last tuesday")
    rgb.rotate(45).save(folder / "nc.png"); add("nc", "nc.png", license="CC-BY-NC-4.0")
    rgb.rotate(30).save(folder / "nolicence.png"); add("nolicence", "nolicence.png", license="")
    rgb.rotate(60).save(folder / "withdrawn.png"); add("withdrawn", "withdrawn.png", consent="withdrawn")
    rgb.rotate(75).save(folder / "noconsent.png"); add("noconsent", "noconsent.png", consent="")
    rgb.rotate(15).save(folder / "orphan.png")  # a file without a row
    with (folder / "metadata.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["record_id", "path", *GOOD])
        writer.writeheader()
        writer.writerows(rows)


@pytest.fixture
def folder_space(workspace: Workspace) -> Workspace:
    shutil.copy(ROOT / "data_cards" / "examples" / "photos.yaml", workspace.root / "data_cards" / "photos.yaml")
    params = small_params()
    params["datasets"] = {"photos": {"kind": "image_folder", "source": "raw/photos", "image_size": 16, "channels": 3}}
    params["ingest"]["max_image_pixels"] = 100_000
    workspace.write_params(params)
    return workspace


def test_every_bad_input_is_quarantined_and_the_rest_ingests(folder_space: Workspace):
    build_folder(folder_space.root / "raw" / "photos")
    result = folder_space.run("ingest", "photos")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    out = folder_space.ingested("photos")
    manifest = pd.read_parquet(out / "manifest.parquet")
    quarantine = pd.read_parquet(out / "quarantine.parquet")
    provenance = json.loads((out / "provenance.json").read_text())

    accepted = {"rgb", "jpeg", "16bit", "palette", "rgba", "grey", "1bit", "cmyk", "nested"}
    assert set(manifest.record_id) == accepted
    expected = {
        "zero": "empty_file", "text": "not_an_image", "truncated": "unreadable_image",
        "corrupt": "unreadable_image", "bomb": "decompression_bomb", "copy": "duplicate_image",
        "escape": "path_escapes_folder", "absolute": "path_escapes_folder", "symlink": "path_escapes_folder",
        "ghost": "file_missing", "when": "invalid_metadata",
        "nc": "license_not_allowed", "nolicence": "license_missing", "withdrawn": "consent_withdrawn",
        "noconsent": "consent_missing", "orphan.png": "no_metadata_row",
    }
    assert dict(zip(quarantine.record_id, quarantine.reason)) == expected | {"rgb": "duplicate_record_id"}
    assert quarantine.set_index("record_id").loc["rgb", "source_uri"] == "file:again.png"
    assert quarantine.detail.str.len().min() > 5, "every quarantined record says why"
    assert provenance["counts"]["read"] == len(accepted) + len(expected) + 1 == len(manifest) + len(quarantine)
    assert "taken_at" in quarantine.set_index("record_id").loc["when", "detail"]
    assert quarantine.set_index("record_id").loc["bomb", "detail"].endswith("ingest.max_image_pixels 100000")

    shards = np.load(out / "pixels" / "shard-00000.npy")
    assert shards.shape == (len(accepted), 16, 16, 3)
    pixels = dict(zip(manifest.record_id, shards[manifest.pixels_index]))
    grey, deep = pixels["grey"].astype(int), pixels["16bit"].astype(int)
    assert (grey[..., 0] == grey[..., 1]).all(), "a grey image becomes three equal channels"
    assert abs(deep[..., 0] - pixels["rgb"][..., 0].astype(int)).max() <= 2, "16-bit values are scaled, not clipped"
    assert pixels["rgba"].mean() > pixels["rgb"].mean(), "alpha is flattened over the white background"
    assert manifest.set_index("record_id").loc["rgb", "contributor"].startswith("c-")
    assert manifest.collected_at.notna().all()


def test_missing_declared_column_is_one_line_error_naming_file_and_column(folder_space: Workspace):
    folder = folder_space.root / "raw" / "photos"
    folder.mkdir(parents=True)
    Image.fromarray(gradient()).save(folder / "a.png")
    (folder / "metadata.csv").write_text("path,license\na.png,CC0-1.0\n")
    result = folder_space.run("ingest", "photos")
    assert result.returncode == 2
    assert "metadata.csv: header: missing column(s)" in result.stderr and "consent" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not folder_space.ingested("photos").exists()


def write_rows(folder: Path, rows: list[list[str]], **open_args) -> None:
    with (folder / "metadata.csv").open("w", newline="", **open_args) as handle:
        csv.writer(handle).writerows([["record_id", "path", *GOOD], *rows])


def test_metadata_that_is_not_utf8_is_one_line_error_naming_its_line(folder_space: Workspace):
    folder = folder_space.root / "raw" / "photos"
    folder.mkdir(parents=True)
    Image.fromarray(gradient()).save(folder / "a.png")
    write_rows(folder, [["a", "a.png", *GOOD.values()], ["b", "a.png", *GOOD.values()]])
    with (folder / "metadata.csv").open("ab") as handle:
        handle.write(b"c,\xff.png\n")  # line 4, after rows that ingest has already written
    result = folder_space.run("ingest", "photos")
    assert result.returncode == 2
    assert result.stderr.strip().endswith("metadata.csv: line 4: not UTF-8 (byte 0xff)"), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not any(Layout(folder_space.root).ingested().iterdir()), "no outputs and no .partial folder"


def test_spreadsheet_csv_with_a_bom_is_read_and_rows_of_the_wrong_width_are_quarantined(folder_space: Workspace):
    folder = folder_space.root / "raw" / "photos"
    folder.mkdir(parents=True)
    for name, angle in (("a.png", 0), ("b.png", 90), ("c.png", 180)):
        Image.fromarray(gradient()).rotate(angle).save(folder / name)
    write_rows(folder, [["a", "a.png", *GOOD.values()], ["b", "b.png", *GOOD.values(), "extra"],
                        ["c", "c.png", *list(GOOD.values())[:-1]], ["d", "a\x00.png", *GOOD.values()]],
               encoding="utf-8-sig")
    assert (folder / "metadata.csv").read_bytes().startswith(b"\xef\xbb\xbf")
    result = folder_space.run("ingest", "photos")
    assert result.returncode == 0, result.stderr
    out = folder_space.ingested("photos")
    assert pd.read_parquet(out / "manifest.parquet").record_id.tolist() == ["a"]
    quarantine = pd.read_parquet(out / "quarantine.parquet").set_index("record_id")
    columns = len(GOOD) + 2
    assert quarantine.reason.to_dict() == {
        "metadata.csv line 3": "malformed_row", "metadata.csv line 4": "malformed_row",
        "metadata.csv line 5": "malformed_row", "b.png": "no_metadata_row", "c.png": "no_metadata_row"}, \
        "a malformed row's path is not trusted"
    assert quarantine.loc["metadata.csv line 3", "detail"].endswith(f"{columns + 1} cells, the header has {columns}")
    assert quarantine.loc["metadata.csv line 4", "detail"].endswith(f"{columns - 1} cells, the header has {columns}")
    assert quarantine.loc["metadata.csv line 5", "detail"].endswith("the path cell holds a NUL byte")
    counts = json.loads((out / "provenance.json").read_text())["counts"]
    assert counts["read"] == 6 == counts["accepted"] + counts["quarantined"]


def test_decompression_bomb_detail_names_the_configured_limit():
    image = Image.new("L", (100, 100))  # 10,000 pixels: Pillow warns above its limit and errs above twice it
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    for limit in (4_000, 9_000):
        with pytest.raises(ImageProblem) as caught:
            decode(buffer.getvalue(), 16, 1, 255, limit)
        assert (caught.value.reason, caught.value.detail) == (
            "decompression_bomb", f"more pixels than ingest.max_image_pixels {limit}")


def run_bounded(space: Workspace, *args: str) -> subprocess.CompletedProcess:
    """The CLI with a short limit, so a regression that blocks on a pipe fails the test instead of hanging."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=space.root, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)


def test_pipes_directories_and_looping_links_are_quarantined_by_type_and_never_opened(folder_space: Workspace):
    folder = folder_space.root / "raw" / "photos"
    folder.mkdir(parents=True)
    Image.fromarray(gradient()).save(folder / "a.png")
    for pipe in (folder / "listed.pipe", folder / "unlisted.pipe", folder / "linked.pipe", folder.parent / "out.pipe"):
        os.mkfifo(pipe)
    (folder / "to_pipe").symlink_to("linked.pipe")
    (folder / "out_link").symlink_to(folder.parent / "out.pipe")
    (folder / "loop_a").symlink_to("loop_b")
    (folder / "loop_b").symlink_to("loop_a")
    (folder / "sub").mkdir()
    rows = {"a": "a.png", "pipe": "listed.pipe", "link": "to_pipe", "escape": "out_link", "dir": "sub",
            "through_loop": "loop_a/x.png"}
    write_rows(folder, [[record_id, path, *GOOD.values()] for record_id, path in rows.items()])
    result = run_bounded(folder_space, "ingest", "photos")
    assert result.returncode == 0, result.stderr
    out = folder_space.ingested("photos")
    assert pd.read_parquet(out / "manifest.parquet").record_id.tolist() == ["a"]
    quarantine = pd.read_parquet(out / "quarantine.parquet").set_index("record_id")
    assert quarantine.reason.to_dict() == {
        "pipe": "not_a_regular_file", "link": "not_a_regular_file", "escape": "path_escapes_folder",
        "dir": "not_a_regular_file", "through_loop": "unreadable_file", "loop_a": "not_a_regular_file",
        "loop_b": "not_a_regular_file", "unlisted.pipe": "not_a_regular_file"}
    assert quarantine.loc["pipe", "detail"] == "'listed.pipe' is a named pipe, not a regular file"
    assert quarantine.loc["unlisted.pipe", "detail"] == "'unlisted.pipe' is a named pipe, not a regular file"
    assert quarantine.loc["dir", "detail"] == "'sub' is a directory, not a regular file"
    assert quarantine.source_sha256.isna().all(), "nothing refused was read"
    assert not list(out.parent.glob(".*partial"))


def test_missing_folder_is_one_line_error(folder_space: Workspace):
    result = folder_space.run("ingest", "photos")
    assert result.returncode == 2 and "datasets.photos.source" in result.stderr


def test_ids_that_differ_only_by_unicode_form_are_one_record_and_by_case_a_warning(folder_space: Workspace):
    """`café` composed and decomposed (as macOS names files) is one id; `Photo-A` and `photo-a` stay two records,
    which validate warns about; a withdrawal typed in either Unicode form matches."""
    folder = folder_space.root / "raw" / "photos"
    folder.mkdir(parents=True)
    names = ["caf\u00e9.png", "cafe\u0301.png", "Photo-A.png", "photo-a.png"]
    rows = []
    for turn, name in enumerate(names):
        Image.fromarray(gradient()).rotate(20 * turn).save(folder / name)
        rows.append({"record_id": "", "path": name, **GOOD})
    with (folder / "metadata.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["record_id", "path", *GOOD])
        writer.writeheader()
        writer.writerows(rows)
    result = folder_space.run("ingest", "photos")
    assert result.returncode == 0, result.stderr
    manifest = pd.read_parquet(folder_space.ingested("photos") / "manifest.parquet")
    quarantine = pd.read_parquet(folder_space.ingested("photos") / "quarantine.parquet")
    assert sorted(manifest.record_id) == ["Photo-A.png", "caf\u00e9.png", "photo-a.png"]
    assert list(zip(quarantine.record_id, quarantine.reason)) == [("caf\u00e9.png", "duplicate_record_id")]
    assert quarantine.source_uri.tolist() == ["file:cafe\u0301.png"], "the file itself keeps its own name"

    assert case_twins(manifest.record_id) == {"Photo-A.png": "Photo-A.png ~ photo-a.png",
                                              "photo-a.png": "photo-a.png ~ Photo-A.png"}
    withdrawals = folder_space.root / "withdrawals.csv"
    withdrawals.write_text("id,requested_at\ncafe\u0301.png,2026-12-01\n", encoding="utf-8")
    assert load_withdrawals(withdrawals) == frozenset({"caf\u00e9.png"})
