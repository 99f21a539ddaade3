"""A data card must not be able to make the governance report read files, fetch URLs or run script (issue 13):
identifiers are refused by the card schema, card text stays text, the HTML embeds only the stage's own
figures, and a report that fails leaves the previous one as it was."""

from __future__ import annotations

import base64
import shutil
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import yaml
from markdown_it import MarkdownIt
from PIL import Image

from pipeline.artifacts import Layout
from pipeline.report.html import report_html
from tests.conftest import Workspace, small_params

HOSTILE_ID = "![x](/etc/hostname)"  # the issue's domain value
PAYLOAD = ('<script>window.pwned=1</script> <img src=x onerror="window.pwned=2"> [link](http://203.0.113.1/) '
           '![x](/etc/hostname) ![](http://example.com/a.png) <http://203.0.113.1/> `code` *em* | pipe $x$')


class _Elements(HTMLParser):
    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def named(self, tag: str) -> list[dict]:
        return [attrs for name, attrs in self.tags if name == tag]


def assert_inert(page: str, image_prefix: str) -> list[dict]:
    """No script, no link target, no event handler, and only images whose source starts with `image_prefix`."""
    elements = _Elements(page)
    assert not elements.named("script"), page
    assert all("href" not in attrs for attrs in elements.named("a")), elements.named("a")
    assert not any(name.startswith("on") for _, attrs in elements.tags for name in attrs)
    images = elements.named("img")
    assert all(attrs["src"].startswith(image_prefix) for attrs in images), images
    return images


# ---------------------------------------------------------------- the card check, end to end

def test_ingest_of_the_issues_digits_card_stops_at_the_card_check_naming_the_field(workspace: Workspace):
    card_file = workspace.root / "data_cards" / "sklearn_digits.yaml"
    card = yaml.safe_load(card_file.read_text())
    card["domains"] = {"column": "label", "values": [HOSTILE_ID, "sklearn_digits"], "held_out": [HOSTILE_ID]}
    card_file.write_text(yaml.safe_dump(card))
    params = small_params()
    params["datasets"] = {"sklearn_digits": params["datasets"]["sklearn_digits"]}
    params["pretrain"]["datasets"] = [{"name": "sklearn_digits", "weight": 1}]
    workspace.write_params(params)
    result = workspace.run("ingest", "sklearn_digits")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "data_cards/sklearn_digits.yaml: domains.values.0: " in lines[0], lines
    assert not workspace.ingested("sklearn_digits").exists()


# ---------------------------------------------------------------- the HTML renderer

@pytest.mark.parametrize("source", ["/etc/hostname", "http://example.com/a.png", "figures/../../../etc/hostname",
                                    "file:///etc/hostname", "figures/unlisted.png", "data:image/png;base64,AAAA"])
@pytest.mark.fast
def test_the_renderer_embeds_only_the_stages_own_figures_and_never_fails(tmp_path: Path, source: str):
    (tmp_path / "figures").mkdir()
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "figures" / "eval-own.png")
    shutil.copy(tmp_path / "figures" / "eval-own.png", tmp_path / "figures" / "unlisted.png")
    markdown = (f"# r\n\n![own](figures/eval-own.png)\n\n![x]({source})\n\n![]({source})\n\n![y][ref]\n\n"
                f"[ref]: {source}\n")
    page = report_html(markdown, tmp_path, "r", 500, ["eval-own.png"])
    images = assert_inert(page, "data:image/png;base64,")
    own = base64.b64encode((tmp_path / "figures" / "eval-own.png").read_bytes()).decode("ascii")
    assert [attrs["src"] for attrs in images] == [f"data:image/png;base64,{own}"], "only the listed figure"
    assert source in page, "the other image is shown as text"


# ---------------------------------------------------------------- the stage, on a real trained model

@pytest.fixture(scope="module")
def hostile(audited: Workspace, tmp_path_factory) -> Workspace:
    """A copy of the shared audited workspace whose card text carries script, link and image payloads, reported
    under a registered model of its own so the shared model's versions and aliases are left alone."""
    root = tmp_path_factory.mktemp("hostile")
    shutil.copytree(audited.root, root, dirs_exist_ok=True)
    space = Workspace(root, env=audited.env)
    card_file = root / "data_cards" / "synthetic.yaml"
    card = yaml.safe_load(card_file.read_text())
    card.update(description=PAYLOAD, known_biases=[PAYLOAD], known_limitations=[PAYLOAD],
                uses={"intended": [PAYLOAD], "out_of_scope": [PAYLOAD]})
    card["consent"]["withdrawal"] = PAYLOAD
    card["provenance"].update(collection_method=PAYLOAD, creators=[PAYLOAD])
    card["personal_information"]["description"] = PAYLOAD
    card_file.write_text(yaml.safe_dump(card))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["report"]["registered_model"] = "mae-encoder-hostile"
    space.write_params(params)
    result = space.run("report")
    assert result.returncode == 0, result.stderr
    return space


def governance(space: Workspace) -> Path:
    return Layout(space.root).governance


def test_card_payloads_stay_inert_in_report_md_html_and_model_card(hostile: Workspace):
    folder = governance(hostile)
    markdown = (folder / "report.md").read_text()
    card = (folder / "model_card.md").read_text()
    assert "window.pwned=1" in markdown and "window.pwned=1" in card, "the text is shown, not dropped"
    # rendered with raw HTML allowed, as GitHub, MLflow and the Hugging Face Hub render Markdown
    renderer = MarkdownIt("commonmark").enable("table")
    assert_inert(renderer.render(markdown), "figures/")
    assert not assert_inert(renderer.render(card.split("---", 2)[2]), "")

    page = (folder / "report.html").read_text()
    images = assert_inert(page, "data:image/png;base64,")
    assert len(images) == len(list((folder / "figures").iterdir())) >= 5, "every figure of the stage, nothing else"
    assert "&lt;script&gt;window.pwned=1&lt;/script&gt;" in page
    assert "![x](/etc/hostname)" in page and "![](http://example.com/a.png)" in page


def test_a_report_that_fails_midway_leaves_the_previous_outputs_byte_identical(hostile: Workspace):
    folder = governance(hostile)
    kept = ("report.html", "release.json", "model_card.md")
    before = {name: (folder / name).read_bytes() for name in kept}
    manifest = hostile.ingested("synthetic") / "manifest.parquet"
    away = manifest.with_name("manifest.away")
    manifest.rename(away)  # read by the Croissant export, after report.md, report.html and model_card.md
    try:
        result = hostile.run("report")
    finally:
        away.rename(manifest)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].endswith("manifest.parquet: not found; run `dvc repro "
                                                           "ingest@synthetic`"), result.stderr
    assert {name: (folder / name).read_bytes() for name in kept} == before
    assert not list((hostile.root / "reports").glob(".*")), "the half-written folder is removed"
