"""The synthetic source: deterministic, and its groups differ in appearance but not in difficulty."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import yaml

from pipeline.cards import DataCard
from pipeline.params import IngestSettings, SyntheticSettings
from pipeline.sources import synthetic
from tests.conftest import ROOT, small_params

pytestmark = pytest.mark.fast  # the unit tier: `make test-fast`

CARD = DataCard.model_validate(yaml.safe_load((ROOT / "data_cards" / "synthetic.yaml").read_text()))


def settings(**changes) -> SyntheticSettings:
    return SyntheticSettings.model_validate({**small_params()["datasets"]["synthetic"], **changes})


def generate(**changes) -> list:
    ingest = IngestSettings.model_validate(small_params()["ingest"])
    return list(synthetic.records(CARD, settings(**changes), ingest))


def test_same_seed_same_records_and_record_i_does_not_depend_on_the_count():
    first, again, longer = generate(num_images=50), generate(num_images=50), generate(num_images=80)
    for a, b, c in zip(first, again, longer):
        assert a.record_id == b.record_id == c.record_id
        assert np.array_equal(a.pixels, b.pixels) and np.array_equal(a.pixels, c.pixels)
        assert a.metadata == b.metadata == c.metadata
    other_seed = generate(num_images=50, seed=1)
    assert not all(np.array_equal(a.pixels, b.pixels) for a, b in zip(first, other_seed))


def test_group_proportions_and_defect_rates_follow_params():
    records = generate(num_images=2000)
    groups = Counter(r.metadata["group"] for r in records)
    assert 0.07 < groups["group_b"] / 2000 < 0.13
    planted = Counter(r.planted.defect for r in records if r.planted)
    for defect, rate in small_params()["datasets"]["synthetic"]["defects"].items():
        assert abs(planted[defect] / 2000 - rate) < 0.012, defect
    clean = generate(num_images=200, defects={})
    assert not any(r.planted for r in clean)


def _orientation_energy(image: np.ndarray) -> tuple[float, float]:
    grey = image.astype(float).mean(axis=2)
    return float(np.abs(np.diff(grey, axis=1)).mean()), float(np.abs(np.diff(grey, axis=0)).mean())


def test_groups_are_rotations_of_each_other():
    """Equal difficulty by construction: group_b's textures are group_a's turned by 90 degrees."""
    quiet = {"site_north": {"share": 1.0, "collected_from": "2024-01-01", "collected_to": "2024-12-31"}}
    records = generate(num_images=600, sites=quiet, group_proportions={"group_a": 0.5, "group_b": 0.5})
    energy = {group: np.array([_orientation_energy(r.pixels) for r in records if r.metadata["group"] == group])
              for group in ("group_a", "group_b")}
    a_horizontal, a_vertical = energy["group_a"].mean(axis=0)
    b_horizontal, b_vertical = energy["group_b"].mean(axis=0)
    assert a_horizontal > 2 * a_vertical and b_vertical > 2 * b_horizontal, "the groups look different"
    # swapping the axes of one group gives the other's statistics: neither group is harder
    assert abs(a_horizontal - b_vertical) / a_horizontal < 0.1
    assert abs(a_vertical - b_horizontal) / a_vertical < 0.1


def test_sites_apply_their_camera_effects():
    records = generate(num_images=600)
    by_site = {site: np.stack([r.pixels for r in records if r.metadata["site"] == site]).astype(float)
               for site in ("site_north", "site_east")}
    blue_over_red = {site: x[..., 2].mean() / x[..., 0].mean() for site, x in by_site.items()}
    assert blue_over_red["site_east"] > 1.15 * blue_over_red["site_north"]
    sharpness = {site: np.abs(np.diff(x, axis=2)).mean() for site, x in by_site.items()}
    assert sharpness["site_east"] < sharpness["site_north"], "the held-out site is blurred"


def test_grey_output_when_one_channel_is_configured():
    records = generate(num_images=5, channels=1, image_size=24)
    assert all(r.pixels.shape == (24, 24, 1) for r in records)
