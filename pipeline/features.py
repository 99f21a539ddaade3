"""Features of a trained encoder and the classifiers read on them, shared by evaluate and the audits.

The encoder's pooled embedding (`embed`), the raw-pixel baseline's features, the randomly initialised model of
the same architecture, and the two frozen-feature classifiers: a linear probe (standardised features, as
BatchNorm without affine does, then an L2-regularised logistic regression) and cosine kNN, each predicting on one
thread so that the same features give the same predictions on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.contracts import ModelConfig
from pipeline.data import NpyRows
from pipeline.mae import MAEEncoder, MaskedAutoencoderViT
from pipeline.normalisation import Normalisation
from pipeline.params import EvaluateSettings

if TYPE_CHECKING:
    from sklearn.pipeline import Pipeline

SCALER_ROWS = 8192  # one chunk for the default data, whose train split is smaller: its probe is bit for bit as fit's


def random_model(config: ModelConfig, seed: int) -> MaskedAutoencoderViT:
    """The same architecture, initialised as pretraining starts but never trained."""
    torch.manual_seed(seed)
    return MaskedAutoencoderViT(**config.model).eval()


@torch.no_grad()
def embed(model: MaskedAutoencoderViT, images: torch.Tensor, pool: str, batch_size: int) -> np.ndarray:
    encoder = MAEEncoder(model, pool=pool).eval()
    return torch.cat([encoder(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]).cpu().numpy()


def raw_pixel_rows(count: int, settings: EvaluateSettings, offset: int) -> np.ndarray:
    """The raw-pixel baseline's images of one split: a seeded sample of at most `raw_pixels_images`, in order."""
    rng = np.random.default_rng([settings.seed, offset])
    return np.sort(rng.permutation(count)[:settings.raw_pixels_images])


def pooling(side: int, size: int) -> tuple[int, int]:
    """The averaging window that brings `side` pixels to at most `size`, and the side it leaves (ceil mode)."""
    window = -(-side // size)
    return window, -(-side // window)


def raw_pixels(pixels: NpyRows, rows: np.ndarray, normalisation: Normalisation, size: int,
               batch_size: int) -> np.ndarray:
    """The normalised pixels of `rows` as features, area-averaged to at most `size` a side, read and reduced a
    batch at a time, so the baseline's memory does not grow with the image size."""
    channels, side = pixels.shape[3], pixels.shape[2]
    factor, pooled = pooling(side, size)
    features = np.empty((len(rows), channels * pooled ** 2), dtype=np.float32)
    for start in range(0, len(rows), batch_size):
        images = normalisation.normalise(pixels[rows[start:start + batch_size]])
        if factor > 1:
            images = torch.nn.functional.avg_pool2d(images, factor, ceil_mode=True)
        features[start:start + batch_size] = images.flatten(1).numpy()
    return features


@dataclass(frozen=True)
class OneThread:
    """A fitted classifier that predicts on one BLAS / OpenMP thread. A threaded matrix product splits its sums by
    the thread count, so the probe's scores (and a near-tie's class) would change with the machine, and threaded
    kNN orders tied neighbours by thread: on one thread the predictions are the same bit for bit everywhere."""

    pipeline: Pipeline

    def predict(self, x: np.ndarray) -> np.ndarray:
        from threadpoolctl import threadpool_limits

        with threadpool_limits(limits=1):
            return self.pipeline.predict(x)


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, c: float, max_iter: int) -> OneThread:
    """Standardises `train_x` in place (and what it predicts on), its statistics gathered SCALER_ROWS rows at a time:
    StandardScaler's fit on a whole split holds float64 copies of it, and the probe would hold its features three
    times over. Fitted on one thread (lbfgs's gradients are threaded matrix products, whose last bits, and so the
    coefficients and 1-3 predictions, changed with the thread count); no slower at this size (2,800 x 384
    features, 10 classes: 1.4 s on one thread, 1.9 s on two)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    scaler = StandardScaler(copy=False)
    for start in range(0, len(train_x), SCALER_ROWS):
        scaler.partial_fit(train_x[start:start + SCALER_ROWS])
    with threadpool_limits(limits=1):
        probe = LogisticRegression(C=c, max_iter=max_iter).fit(scaler.transform(train_x), train_y)
    return OneThread(make_pipeline(scaler, probe))


def knn(train_x: np.ndarray, train_y: np.ndarray, k: int) -> OneThread:
    """Cosine kNN: features scaled to unit length in place (`train_x`, and what it predicts on), then Euclidean
    neighbours, which rank as cosine ones do (|a - b|^2 = 2 - 2 cos a,b for unit vectors). scikit-learn's cosine
    metric would copy the normalised train features for every chunk of queries; Euclidean distances are computed in
    bounded chunks."""
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import Normalizer

    return OneThread(make_pipeline(Normalizer(copy=False),
                                   KNeighborsClassifier(n_neighbors=min(k, len(train_x)), algorithm="brute"))
                     .fit(train_x, train_y))


def accuracy(predicted: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean(np.asarray(predicted) == np.asarray(truth))) if len(truth) else float("nan")
