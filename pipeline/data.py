"""The data path: prepared splits read by row, in batches, through a DataLoader; pixels become model input
(augmented, normalised) per batch on the device.

A split is never loaded whole. `SplitPixels` reads the uint8 [N, H, W, C] .npy by row with plain file reads
(`NpyRows`; several splits, the train splits of every dataset the model trains on, read end to end as one), and an
item is a whole batch, read by its row indices (a read per run of consecutive rows, in the loader's worker
processes). The samples of each batch come from `Batches`, a sampler run in the training process: for
training, a permutation of the epoch's samples seeded by (seed, epoch) cut into global batches of which each DDP
process takes its slice; for evaluation, every row in order. A sample is a row, unless a `Mixture` draws the epoch
from several splits by weight: then it says which row each sample is.
Everything random about a training sample (its masking noise, crop box and flip) is drawn from a generator seeded
by (seed, epoch, sample) (`Draws`). So what an optimiser step sees depends neither on the number of loader workers,
nor on the number of processes, nor on where a resumed run started, and a resumed run skips the batches it already
trained on without reading them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

from pipeline import PipelineError
from pipeline.artifacts import read_array
from pipeline.normalisation import Normalisation, unit
from pipeline.params import AugmentSettings

Request = tuple[int, np.ndarray]  # (epoch, samples): what the sampler asks the dataset for (rows, unless a Mixture)


def resolve_device(choice: str) -> torch.device:
    """`auto`: CUDA where present, else the CPU."""
    return torch.device("cuda" if choice == "cuda" or (choice == "auto" and torch.cuda.is_available()) else "cpu")


def crop_box(rng: np.random.Generator, height: int, width: int, scale: tuple[float, float],
             ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random resized crop, drawn as torchvision's RandomResizedCrop does: ten tries
    at an area share in `scale` and an aspect ratio log-uniform in `ratio`, else the centre crop nearest `ratio`."""
    area = height * width
    log_ratio = np.log(ratio)
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    if width / height < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif width / height > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@dataclass(frozen=True)
class Draws:
    """What training draws per sample, from a generator seeded by (seed, epoch, sample): the masking noise, then the
    crop box (when cropping), then the flip. A sample is its place among the epoch's samples (its row, where the
    epoch draws every row once), so a row a Mixture draws twice in an epoch is masked and augmented twice afresh."""

    seed: int
    patch_size: int
    augment: AugmentSettings

    def __call__(self, epoch: int, samples: np.ndarray, height: int, width: int) -> dict[str, torch.Tensor]:
        patches = (height // self.patch_size) * (width // self.patch_size)
        noise = np.empty((len(samples), patches), dtype=np.float32)
        boxes = np.empty((len(samples), 4), dtype=np.int64)
        flips = np.zeros(len(samples), dtype=bool)
        for k, sample in enumerate(samples):
            rng = np.random.default_rng([self.seed, epoch, int(sample)])
            noise[k] = rng.random(patches, dtype=np.float32)
            if self.augment.random_resized_crop:
                boxes[k] = crop_box(rng, height, width, self.augment.scale, self.augment.ratio)
            if self.augment.flip:
                flips[k] = rng.random() < 0.5
        drawn = {"noise": torch.from_numpy(noise), "flip": torch.from_numpy(flips)}
        if self.augment.random_resized_crop:
            drawn["crop"] = torch.from_numpy(boxes)
        return drawn


class NpyRows:
    """A .npy array, or several read end to end as one (row len(first) is the second's first), read by row with
    plain file reads: indexing returns the rows asked for, each run of consecutive rows in one read. No memory map:
    a map keeps every page it touched in the process's resident set while it is open, and even a map made for one
    access maps a freshly written file's page cache in large folios (up to 2 MiB each, whole), so a batch of 256
    random 12 KB rows of a 690 MB split just written by prepare showed 350 MiB of file pages in the process."""

    def __init__(self, paths: Path | Sequence[Path]):
        self.paths = [Path(paths)] if isinstance(paths, (str, Path)) else [Path(path) for path in paths]
        shapes, self.offsets = [], []
        for path in self.paths:
            mapped = read_array(path, mmap=True)  # the header only: shape, dtype and where the data starts
            if shapes and mapped.shape[1:] != shapes[0][1:]:
                raise PipelineError(f"{path}: images of shape {mapped.shape[1:]}, not the {shapes[0][1:]} of "
                                    f"{self.paths[0]}: the splits read together must hold images of one shape")
            if not mapped.flags.c_contiguous:
                raise PipelineError(f"{path}: a Fortran-ordered array; the pipeline writes rows in C order")
            shapes.append(mapped.shape)
            self.offsets.append(mapped.offset)
            self.dtype = mapped.dtype
        self.sizes = tuple(shape[0] for shape in shapes)
        self.shape = (sum(self.sizes), *shapes[0][1:])
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        rows = np.arange(*index.indices(len(self))) if isinstance(index, slice) else np.asarray(index)
        if rows.dtype == bool:
            rows = np.flatnonzero(rows)
        scalar = rows.ndim == 0
        rows = np.atleast_1d(rows).astype(np.int64)
        if len(rows) and (rows.min() < -len(self) or rows.max() >= len(self)):
            raise IndexError(f"rows out of range for {len(self)} rows")
        rows = np.where(rows < 0, rows + len(self), rows)
        taken = np.empty((len(rows), *self.shape[1:]), dtype=self.dtype)
        ends = np.cumsum(self.sizes)
        which = np.searchsorted(ends, rows, side="right")
        for k in np.unique(which):
            mine = np.flatnonzero(which == k)
            self._read(k, rows[mine] - (ends[k] - self.sizes[k]), taken, mine)
        return taken[0] if scalar else taken

    def _read(self, k: int, rows: np.ndarray, into: np.ndarray, places: np.ndarray) -> None:
        """Rows of file k into `into[places]`, a run of consecutive rows (that land consecutively) per read."""
        breaks = np.flatnonzero((np.diff(rows) != 1) | (np.diff(places) != 1)) + 1
        with open(self.paths[k], "rb", buffering=0) as handle:
            for run_rows, run_places in zip(np.split(rows, breaks), np.split(places, breaks)):
                target = memoryview(into[run_places[0]:run_places[-1] + 1]).cast("B")
                handle.seek(self.offsets[k] + int(run_rows[0]) * self.row_bytes)
                if handle.readinto(target) != len(target):
                    raise PipelineError(f"{self.paths[k]}: shorter than its header says (truncated?)")


def largest_remainder(total: int, weights: Sequence[float]) -> tuple[int, ...]:
    """`total` split in proportion to `weights` (exactly, in fractions): each part its quota rounded down, the parts
    left over going to the largest remainders (the first on a tie)."""
    exact = [Fraction(weight) for weight in weights]
    quotas = [total * weight / sum(exact) for weight in exact]
    parts = [math.floor(quota) for quota in quotas]
    by_remainder = sorted(range(len(quotas)), key=lambda k: (parts[k] - quotas[k], k))
    for k in by_remainder[:total - sum(parts)]:
        parts[k] += 1
    return tuple(parts)


class Mixture:
    """Which row each sample of an epoch is, when the epoch draws from several splits read end to end by weight.

    An epoch has as many samples as the splits hold rows together; split k's share of them follows its weight
    (`largest_remainder`). Its rows: every one of them once per whole time its share holds its size, then the first
    of its own permutation seeded by (seed, epoch, k) for the rest. Samples are numbered split after split;
    `Batches` shuffles them all together by (seed, epoch). Where every share equals its split's size (one split, or
    weights in proportion to the sizes) sample s is row s, as in a single split's epoch, so the batches are the same
    as without a mixture."""

    def __init__(self, sizes: Sequence[int], weights: Sequence[float], seed: int):
        self.sizes, self.seed = tuple(sizes), seed
        self.shares = largest_remainder(sum(self.sizes), weights)
        empty = next((k for k, (size, share) in enumerate(zip(self.sizes, self.shares)) if share and not size), None)
        if empty is not None:
            raise ValueError(f"split {empty} is empty, yet its weight gives it {self.shares[empty]} samples")
        self._epoch: tuple[int, np.ndarray] | None = None  # the last epoch's rows (each loader worker its own)

    @property
    def whole(self) -> bool:
        """Every row drawn once per epoch."""
        return self.shares == self.sizes

    def epoch_rows(self, epoch: int) -> np.ndarray:
        """Row of every sample of `epoch`, in sample order."""
        parts, offset = [], 0
        for k, (size, share) in enumerate(zip(self.sizes, self.shares)):
            cycles, rest = divmod(share, size) if size else (0, 0)
            rest_rows = np.random.default_rng([self.seed, epoch, k]).permutation(size)[:rest]
            parts += [offset + np.arange(size)] * cycles + [offset + rest_rows]
            offset += size
        return np.concatenate(parts)

    def rows(self, epoch: int, samples: np.ndarray) -> np.ndarray:
        """The rows these samples of `epoch` are."""
        if self.whole:
            return samples
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.epoch_rows(epoch))
        return self._epoch[1][samples]


class SplitPixels(Dataset):
    """Prepared splits' uint8 pixels, read by row (`NpyRows`: one split, or several end to end); an item is a batch:
    {"rows", "pixels" (uint8 [B, H, W, C])}, plus the draws of each sample when `draws` is given. With `weights`
    (training, one per split) an epoch's samples are a `Mixture` seeded by the draws' seed; without, sample s is
    row s."""

    def __init__(self, path: Path | Sequence[Path], draws: Draws | None = None,
                 weights: Sequence[float] | None = None):
        self.pixels, self.draws = NpyRows(path), draws
        self.mixture = None if weights is None else Mixture(self.pixels.sizes, weights, draws.seed)

    def __len__(self) -> int:
        return len(self.pixels)

    def __getitem__(self, request: Request) -> dict[str, torch.Tensor]:
        epoch, samples = request
        rows = samples if self.mixture is None else self.mixture.rows(epoch, samples)
        batch = {"rows": torch.from_numpy(rows), "pixels": torch.from_numpy(self.pixels[rows])}
        if self.draws is not None:
            batch.update(self.draws(epoch, samples, *self.pixels.shape[1:3]))
        return batch


class Batches(Sampler):
    """The batches of one pass over a split of `size` rows (or an epoch of `size` samples), as (epoch, rows)
    requests.

    Shuffled: the permutation seeded by (seed, epoch), cut into `count` global batches of batch_size x world_size
    rows (a remainder is dropped), of which process `rank` takes its slice, from global batch `start` on (set
    `epoch` and `start` before each pass). In order: every row, in batches of batch_size."""

    def __init__(self, size: int, batch_size: int, shuffle: bool = False, seed: int = 0, rank: int = 0,
                 world_size: int = 1, count: int | None = None):
        self.size, self.batch_size, self.shuffle, self.seed, self.rank = size, batch_size, shuffle, seed, rank
        self.global_batch = batch_size * world_size
        self.count = count if count is not None else size // self.global_batch if shuffle else -(-size // batch_size)
        self.epoch = self.start = 0

    def __len__(self) -> int:
        return self.count - self.start

    def __iter__(self):
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        if not self.shuffle:
            for batch in range(self.start, self.count):
                yield self.epoch, np.arange(batch * self.batch_size, min((batch + 1) * self.batch_size, self.size))
            return
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.size)
        for batch in range(self.start, self.count):
            yield self.epoch, order[batch * self.global_batch:(batch + 1) * self.global_batch][mine]


class Epochs(Sampler):
    """The requests of `batches` for epochs `first` to `last` - 1, the first from micro-batch `start` on: one
    loader iterator for a whole run, so its workers read the next epoch's first batches while this one ends (a new
    iterator per epoch would leave the device idle while they start again)."""

    def __init__(self, batches: Batches, first: int, last: int, start: int = 0):
        self.batches, self.first, self.last, self.start = batches, first, last, start

    def __len__(self) -> int:
        return max(0, (self.last - self.first) * self.batches.count - self.start)

    def __iter__(self):
        for epoch in range(self.first, self.last):
            self.batches.epoch, self.batches.start = epoch, self.start if epoch == self.first else 0
            yield from self.batches


def loader(dataset: SplitPixels, batches: Sampler, workers: int, device: torch.device,
           prefetch: int = 2) -> DataLoader:
    """Batches read by `workers` processes (kept across epochs), `prefetch` each ahead, pinned for a CUDA copy.
    Its own generator, so making an iterator leaves the global random state alone."""
    return DataLoader(dataset, sampler=batches, batch_size=None, num_workers=workers,
                      pin_memory=device.type == "cuda", prefetch_factor=prefetch if workers else None,
                      persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0))


def augment(images: torch.Tensor, flips: torch.Tensor, boxes: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample of [N, C, H, W] images in [0, 1]: the crop box (top, left, height, width) resized back to H x W
    (bicubic, as the MAE recipe; one affine grid per sample, so one batched resampling), then the flip."""
    if boxes is None:
        return torch.where(flips.view(-1, 1, 1, 1), images.flip(-1), images)
    n, _, height, width = images.shape
    top, left, h, w = boxes.to(images.dtype).unbind(1)
    theta = torch.zeros(n, 2, 3, dtype=images.dtype, device=images.device)
    # output pixel centres (align_corners=False) onto the box's, in the input's [-1, 1] coordinates
    theta[:, 0, 0] = w / width * (1 - 2 * flips.to(images.dtype))
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False).clamp(0, 1)


def model_input(batch: dict[str, torch.Tensor], normalisation: Normalisation, device: torch.device) -> torch.Tensor:
    """A loader batch as the model reads it, on `device`: uint8 -> [0, 1] -> augmented where the batch carries
    draws -> normalised. The copy is asynchronous from pinned memory."""
    images = unit(batch["pixels"].to(device, non_blocking=True))
    if "flip" in batch:
        crop = batch.get("crop")
        images = augment(images, batch["flip"].to(device, non_blocking=True),
                         None if crop is None else crop.to(device, non_blocking=True))
    return normalisation.standardise(images)


def training_input(batch: dict[str, torch.Tensor], normalisation: Normalisation,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """A training batch as the step reads it, on `device`: the model input and each sample's masking noise."""
    return model_input(batch, normalisation, device), batch["noise"].to(device, non_blocking=True)


def on_device(batches: Iterable[dict], prepare: Callable[[dict], tuple[torch.Tensor, ...]],
              device: torch.device) -> Iterator[tuple[torch.Tensor, ...]]:
    """`prepare(batch)` for each loader batch. On CUDA the next batch is prepared on a side stream while the current
    one trains, so its copy from pinned memory and its augmentation overlap the training step (as timm's
    PrefetchLoader); each batch's tensors are handed over once its own preparation is done."""
    if device.type != "cuda":
        yield from map(prepare, batches)
        return
    main, side = torch.cuda.current_stream(device), torch.cuda.Stream(device)
    side.wait_stream(main)  # whatever prepare reads that the main stream made (normalisation statistics)

    def issue(batch: dict) -> tuple[tuple[torch.Tensor, ...], torch.cuda.Event]:
        with torch.cuda.stream(side):
            prepared = prepare(batch)
            done = torch.cuda.Event()
            done.record(side)
        return prepared, done

    def hand_over(prepared: tuple[torch.Tensor, ...], done: torch.cuda.Event) -> tuple[torch.Tensor, ...]:
        main.wait_event(done)
        for tensor in prepared:
            tensor.record_stream(main)  # made on the side stream: not reused there until the main stream is done
        return prepared

    ahead = None
    for batch in batches:
        issued = issue(batch)
        if ahead is not None:
            yield hand_over(*ahead)
        ahead = issued
    if ahead is not None:
        yield hand_over(*ahead)
