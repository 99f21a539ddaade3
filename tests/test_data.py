"""The data path: memory-mapped splits read in batches, the same whatever the workers or processes, reproducible
augmentation, streaming statistics, the bounded raw-pixel baseline, and one-line errors for bad settings."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
import yaml

from pipeline import PipelineError
from pipeline.data import (
    Batches,
    Draws,
    Epochs,
    NpyRows,
    SplitPixels,
    augment,
    crop_box,
    loader,
    model_input,
    on_device,
)
from pipeline.features import raw_pixel_rows, raw_pixels
from pipeline.normalisation import Normalisation
from pipeline.params import AugmentSettings, EvaluateSettings, load_params
from pipeline.trained import Split, take
from tests.conftest import Workspace, default_params

CPU = torch.device("cpu")
CROP = AugmentSettings(flip=True, random_resized_crop=True)


@pytest.fixture
def split(tmp_path):
    path = tmp_path / "train.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (70, 16, 16, 3), dtype=np.uint8))
    return path


def batches_of(data: SplitPixels, batches: Batches, workers: int) -> list[dict]:
    return list(loader(data, batches, workers, CPU))


def same(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
                                    for x, y in zip(a, b))


def test_batches_come_out_uint8_in_order_for_evaluation(split):
    data = SplitPixels(split)
    (first, *rest) = batches_of(data, Batches(len(data), 32), 0)
    assert first["pixels"].dtype == torch.uint8 and first["pixels"].shape == (32, 16, 16, 3)
    assert [len(b["rows"]) for b in rest] == [32, 6], "evaluation reads every row, in order"
    assert torch.equal(torch.cat([first["rows"], *(b["rows"] for b in rest)]), torch.arange(70))
    assert np.array_equal(first["pixels"].numpy(), np.load(split)[:32])


def test_rows_read_from_files_end_to_end_are_numpy_s_rows(tmp_path):
    parts = [np.random.default_rng(k).integers(0, 255, size=(n, 4, 4, 3), dtype=np.uint8)
             for k, n in enumerate((7, 1, 12))]
    paths = [tmp_path / f"part{k}.npy" for k in range(len(parts))]
    for path, part in zip(paths, parts):
        np.save(path, part)
    whole, rows = np.concatenate(parts), NpyRows(paths)
    assert rows.shape == whole.shape and rows.sizes == (7, 1, 12)
    for index in (3, -1, slice(None), slice(5, 9), slice(18, 2, -3), [19, 0, 7, 7, 8, 1, 2, 3], np.arange(20)[::-2],
                  np.array([], dtype=int), whole[:, 0, 0, 0] > 100):
        assert np.array_equal(rows[index], whole[index]), index
    with pytest.raises(IndexError):
        rows[[20]]


def test_a_pass_over_the_split_never_materialises_it(tmp_path):
    path = tmp_path / "large.npy"
    np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(2000, 32, 32, 3))[:] = 7  # 6 MiB
    data = SplitPixels(path)
    assert len(data) == 2000 and data.pixels.shape == (2000, 32, 32, 3)
    tracemalloc.start()  # numpy reports its buffers to tracemalloc
    try:
        for batch in loader(data, Batches(len(data), 64, shuffle=True), 0, CPU):
            assert batch["pixels"].dtype == torch.uint8
        normalisation = Normalisation.fit(data.pixels, chunk_bytes=2**18)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**21, f"{peak} bytes: more than a chunk or a few batches of a 6 MiB split"
    assert normalisation.mean == pytest.approx([7 / 255] * 3)


def test_the_loader_yields_the_same_batches_at_0_and_2_workers_and_each_process_its_slice(split):
    data = SplitPixels(split, Draws(3, 4, CROP))
    order = Batches(len(data), 8, shuffle=True, seed=3)
    order.epoch = 2
    single = batches_of(data, order, 0)
    assert same(single, batches_of(data, order, 2))
    assert len(single) == 70 // 8 and len({int(r) for b in single for r in b["rows"]}) == 8 * (70 // 8)
    # two processes of 4 each: rank 0 and rank 1 halves of the same global batch, with the same draws per row
    halves = []
    for rank in (0, 1):
        sliced = Batches(len(data), 4, shuffle=True, seed=3, rank=rank, world_size=2)
        sliced.epoch = 2
        halves.append(batches_of(data, sliced, 0))
    for whole, first, second in zip(single, *halves):
        assert all(torch.equal(whole[k], torch.cat([first[k], second[k]])) for k in whole)
    # a resumed pass skips the batches it had without reading them
    order.start = 5
    assert same(batches_of(data, order, 2), single[5:])


def test_one_loader_over_a_resumed_run_yields_each_epochs_batches_in_turn(split):
    data = SplitPixels(split, Draws(3, 4, CROP))
    order = Batches(len(data), 8, shuffle=True, seed=3)
    run = batches_of(data, Epochs(order, 1, 3, start=5), 2)  # from micro-batch 5 of epoch 1 to the end of epoch 2
    expected = []
    for epoch, start in ((1, 5), (2, 0)):
        alone = Batches(len(data), 8, shuffle=True, seed=3)
        alone.epoch, alone.start = epoch, start
        expected += batches_of(data, alone, 0)
    assert len(run) == len(Epochs(order, 1, 3, start=5)) == (70 // 8 - 5) + 70 // 8
    assert same(run, expected)
    # the batches as the loop reads them: prepared in order (on a CPU, with no side stream)
    prepared = list(on_device(iter(run), lambda batch: (batch["rows"],), CPU))
    assert all(torch.equal(rows, batch["rows"]) for (rows,), batch in zip(prepared, run, strict=True))


def test_augmentation_is_reproducible_from_seed_epoch_and_row(split):
    draws = Draws(0, 4, CROP)
    rows = np.array([5, 9, 60])
    one = draws(1, rows, 16, 16)
    assert all(torch.equal(one[k], draws(1, rows, 16, 16)[k]) for k in one)
    # a row's draws do not depend on the batch it is in
    alone = draws(1, rows[1:2], 16, 16)
    assert all(torch.equal(one[k][1], alone[k][0]) for k in one)
    other_epoch, other_seed = draws(2, rows, 16, 16), Draws(1, 4, CROP)(1, rows, 16, 16)
    assert not torch.equal(one["noise"], other_epoch["noise"]) and not torch.equal(one["crop"], other_epoch["crop"])
    assert not torch.equal(one["noise"], other_seed["noise"])
    assert one["noise"].shape == (3, 16)
    assert set(Draws(0, 4, AugmentSettings(flip=False))(1, rows, 16, 16)) == {"noise", "flip"}
    assert not Draws(0, 4, AugmentSettings(flip=False))(1, rows, 16, 16)["flip"].any()

    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left, h, w = crop_box(rng, 16, 32, (0.2, 1.0), (0.75, 4 / 3))
        assert 0 <= top <= 16 - h and 0 <= left <= 32 - w and h > 0 and w > 0


def test_the_crop_is_a_bicubic_resize_of_the_box_and_the_flip_mirrors():
    images = torch.rand(2, 3, 16, 16)
    full = torch.tensor([[0, 0, 16, 16], [0, 0, 16, 16]])
    flipped = augment(images, torch.tensor([False, True]), full)
    assert torch.allclose(flipped, torch.stack([images[0], images[1].flip(-1)]), atol=1e-5)
    assert torch.equal(augment(images, torch.tensor([False, True])), torch.stack([images[0], images[1].flip(-1)]))
    # the top-left 8 x 8 box, resized to 16 x 16: torch's bicubic upscaling of that box, away from the box's edges
    # (where the crop reads the neighbouring pixels instead of repeating the edge)
    box = augment(images, torch.tensor([False, False]), torch.tensor([[0, 0, 8, 8], [0, 0, 8, 8]]))
    expected = F.interpolate(images[:, :, :8, :8], size=(16, 16), mode="bicubic", align_corners=False).clamp(0, 1)
    assert torch.allclose(box[..., 4:12, 4:12], expected[..., 4:12, 4:12], atol=1e-5)


def test_model_input_normalises_and_augments_on_the_device(split):
    data = SplitPixels(split, Draws(0, 4, AugmentSettings(flip=False)))
    normalisation = Normalisation.fit(data.pixels)
    batch = data[(0, np.arange(4))]
    assert torch.allclose(model_input(batch, normalisation, CPU), normalisation.normalise(np.load(split)[:4]))


def test_normalisation_from_one_streaming_pass_equals_the_whole_array(split):
    pixels = SplitPixels(split).pixels
    streamed = Normalisation.fit(pixels, chunk_bytes=1000)  # 1,000 bytes: many chunks of one image
    values = np.load(split).reshape(-1, 3) / 255.0
    assert streamed.mean == pytest.approx(values.mean(axis=0), abs=1e-12)
    assert streamed.std == pytest.approx(values.std(axis=0), abs=1e-12)


def test_the_raw_pixel_baseline_is_a_bounded_seeded_sample_of_reduced_images():
    settings = EvaluateSettings(mask_ratio=0.75, raw_pixels_images=50, raw_pixels_size=8)
    rows = raw_pixel_rows(200, settings, offset=1)
    assert len(rows) == 50 and np.all(np.diff(rows) > 0) and np.array_equal(rows, raw_pixel_rows(200, settings, 1))
    assert len(raw_pixel_rows(30, settings, 1)) == 30, "a smaller split is used whole"
    pixels = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    normalisation = Normalisation.fit(pixels)
    rows = np.array([0, 2, 3])
    features = raw_pixels(pixels, rows, normalisation, 8, batch_size=2)
    assert features.shape == (3, 3 * 8 * 8)
    assert features[1, 0] == pytest.approx(float(normalisation.normalise(pixels[2:3])[0, 0, :4, :4].mean()), abs=1e-6)
    whole = raw_pixels(pixels, rows, normalisation, 32, batch_size=2)
    assert np.allclose(whole, normalisation.normalise(pixels[rows]).flatten(1).numpy())
    assert raw_pixels(pixels, rows, normalisation, 10, batch_size=2).shape == (3, 3 * 8 * 8), "whole windows: 4 x 4"


@pytest.mark.parametrize("key, value, message", [
    ("checkpoint_every_steps", 0, "pretrain.checkpoint_every_steps: Input should be greater than 0"),
    ("augment", {"random_resized_crop": True, "scale": [0.0, 1.0]}, "pretrain.augment: Value error, scale [0.0, 1.0]"),
    ("augment", {"scale": [0.5, 1.5]}, "must be [low, high] with 0 < low <= high <= 1"),
    ("flip", True, "`flip` has moved to `augment.flip`"),
])
def test_bad_training_settings_are_one_line_errors(tmp_path, key, value, message):
    params = default_params()
    params["pretrain"][key] = value
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    with pytest.raises(PipelineError) as error:
        load_params(path)
    assert message in str(error.value) and "\n" not in str(error.value)


def test_the_command_line_names_the_file_and_field_of_a_bad_setting(tmp_path):
    space = Workspace(tmp_path)
    params = default_params()
    params["pretrain"]["checkpoint_every_steps"] = 0
    space.write_params(params)
    result = space.run("pretrain")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "params.yaml: pretrain.checkpoint_every_steps: Input should be greater than 0" in result.stderr


def test_take_reads_rows_across_splits_end_to_end(tmp_path):
    parts = [np.random.default_rng(k).integers(0, 256, (n, 4, 4, 1), dtype=np.uint8) for k, n in enumerate((5, 0, 7))]
    splits = []
    for k, part in enumerate(parts):
        np.save(tmp_path / f"{k}.npy", part)
        splits.append(Split(str(k), pd.DataFrame(), SplitPixels(tmp_path / f"{k}.npy")))
    rows = np.array([11, 0, 5, 4, 6])
    assert np.array_equal(take(splits, rows), np.concatenate(parts)[rows])
    assert take(splits, np.array([], dtype=int)).shape == (0, 4, 4, 1)
