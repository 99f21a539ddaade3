"""The evaluate stage: how good the pretrained model is, against honest baselines, sample by sample.

Reconstruction: hidden-pixel MSE and PSNR of every image on masks fixed by evaluate.seed, so two models
or two runs compare on the same masks; baselines are a randomly initialised model of the same
architecture and predicting each hidden patch's own mean. Representations (where the card has labels):
a linear probe (standardised features, as BatchNorm without affine does, then an L2-regularised
logistic regression) and kNN top-1 (k neighbours, cosine), each fitted on the train split's frozen
features, for the MAE encoder and the same baselines plus raw pixels (the features and classifiers are
`pipeline.features`, which the audits share). The per-sample errors are what the audits read: bias and shift,
and memorization (training against unseen images), which the report measures.

Writes data/eval/samples.parquet (one row per record of every split: the audits' input) and
embeddings/<kind>.npy (each encoder's features: row i is the table's row i), metrics/eval.json
(`contracts.EvalMetrics`), and reconstruction grids per group and per domain in reports/eval/; logs all of it to the
model's MLflow run.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline.artifacts import EVAL_FIGURES, EVAL_METRICS, Layout, Staged, allocated, write_json
from pipeline.cards import DataCard, card_path, load_card
from pipeline.contracts import ClassifierScores, EvalMetrics
from pipeline.data import Batches, NpyRows, loader, model_input, resolve_device
from pipeline.features import accuracy, embed, knn, linear_probe, pooling, random_model, raw_pixel_rows, raw_pixels
from pipeline.mae import MAEEncoder, MaskedAutoencoderViT
from pipeline.normalisation import Normalisation
from pipeline.params import DEFAULT_PARAMS, EvaluateSettings, load_params
from pipeline.reconstruction import masking_noise, psnr, reconstruct, reconstruction_figure
from pipeline.render import drawn, save_figure
from pipeline.tracking import model_run
from pipeline.trained import Split, load_splits, load_trained

log = logging.getLogger(__name__)

FEATURES = ("mae", "random_init", "raw_pixels")
# scikit-learn computes kNN distances in chunks of this size: by default 1 GiB, which a large split fills
WORKING_MEMORY_MIB = 64


def labelled(card: DataCard, train: pd.DataFrame) -> str | None:
    """None when the probe and kNN can run, else why not (the report says so)."""
    if card.labels is None:
        return f"card {card.name} declares no labels"
    known = train["label"].dropna()
    if known.nunique() < 2:
        return "the train split has fewer than two labelled classes"
    return None


def representation_metrics(splits: dict[str, Split], features: Callable[[str, str], np.ndarray],
                           sampled: dict[str, np.ndarray], settings: EvaluateSettings
                           ) -> tuple[dict, dict[str, dict[str, dict[str, np.ndarray]]]]:
    """Probe and kNN accuracy per feature kind and evaluated split, and every kind's per-sample predictions
    (`[method][kind][split]`, one per record of the split: None for the raw-pixel baseline's records outside its
    sample), which the model checks pair image by image. `features(kind, split)` reads a fresh copy of one kind's
    features of one split (raw-pixel features exist for the rows `sampled` of each split only), which the classifier
    scales in place: one classifier at a time holds its train features and one other split's, once."""
    from sklearn import config_context

    fits = {"probe": lambda x, y: linear_probe(x, y, settings.probe_c, settings.probe_max_iter),
            "knn": lambda x, y: knn(x, y, settings.knn_k)}
    scores: dict = {"probe": {}, "knn": {}}
    predictions: dict[str, dict[str, dict[str, np.ndarray]]] = {method: {kind: {} for kind in FEATURES}
                                                                for method in fits}
    for kind in FEATURES:
        labels = {name: split.records["label"].to_numpy()[sampled[name] if kind == "raw_pixels" else slice(None)]
                  for name, split in splits.items()}
        has_label = pd.notna(labels["train"])
        for method, fit in fits.items():
            train_x = features(kind, "train")
            classifier = fit(train_x if has_label.all() else train_x[has_label], labels["train"][has_label])
            del train_x
            for name in splits:
                if name == "train":
                    continue
                with config_context(working_memory=WORKING_MEMORY_MIB):
                    predicted = classifier.predict(features(kind, name))
                known = pd.notna(labels[name])
                scores[method].setdefault(name, {})[kind] = accuracy(predicted[known], labels[name][known])
                if kind == "raw_pixels":
                    predicted = placed(predicted, sampled[name], len(splits[name]))
                predictions[method][kind][name] = predicted
            del classifier
    for method in ("probe", "knn"):
        reference = scores[method].get("test") or next(iter(scores[method].values()))
        scores[method]["margin_over_random_init"] = reference["mae"] - reference["random_init"]
        scores[method]["margin_over_raw_pixels"] = reference["mae"] - reference["raw_pixels"]
    scores["knn"]["k"] = settings.knn_k
    return scores, predictions


def placed(predicted: np.ndarray, rows: np.ndarray, count: int) -> np.ndarray:
    """The predictions of `rows` of a split of `count` records, in place, None for the other records."""
    full = np.full(count, None, dtype=object)
    full[rows] = predicted
    return full


def correctness(predicted: pd.Series, label: pd.Series) -> pd.Series:
    """1 where the prediction names the label, 0 where not, null where there is no prediction or no label."""
    return (predicted == label).astype(float).where(predicted.notna() & label.notna())


def correct_columns(method: str) -> list[str]:
    """The samples table's per-record correctness of `method` ("probe", "knn") for each of FEATURES, in order: the
    MAE's (`probe_correct`), then each baseline's (`probe_correct_random_init`, `probe_correct_raw_pixels`)."""
    return [f"{method}_correct" if kind == "mae" else f"{method}_correct_{kind}" for kind in FEATURES]


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def grids(model: MaskedAutoencoderViT, splits: dict[str, Split], attributes: list[str], normalisation: Normalisation,
          settings: EvaluateSettings, mask_ratio: float, folder: Path) -> list[Path]:
    """Original / masked / reconstruction of unseen images, one figure per sensitive group and per domain."""
    unseen = [s for name, s in splits.items() if name != "train" and len(s.records)]
    records = pd.concat([s.records.assign(from_split=s.name, row=np.arange(len(s.records))) for s in unseen])
    written = []
    panels = [(f"{attr} = {drawn(value)}", f"{slug(attr)}-{slug(str(value))}", part)
              for attr in attributes for value, part in records.groupby(attr)]
    panels += [(f"domain {drawn(value)}", f"domain-{slug(str(value))}", part)
               for value, part in records.groupby("domain")]
    for title, name, part in panels:
        chosen = part.sort_values("record_id").head(settings.figure_images)
        batch = normalisation.normalise(np.stack([splits[item.from_split].pixels[item.row]
                                                  for item in chosen.itertuples()]))
        noise = masking_noise(len(batch), model.patch_embed.num_patches, settings.seed)
        figure = reconstruction_figure(model, batch, noise, normalisation, mask_ratio, title)
        written.append(save_figure(figure, folder / f"{name}.png"))
    return written


def write_rows(path: Path, rows: np.ndarray, values: np.ndarray) -> None:
    """Rows of an .npy file, written through a memory map made for this write alone: a map kept open would keep
    every page written in the process's resident set, so features written for a whole collection would show in
    its memory."""
    np.lib.format.open_memmap(path, mode="r+")[rows] = values


@torch.no_grad()
def measure(model: MaskedAutoencoderViT, baseline_model: MaskedAutoencoderViT, split: Split,
            normalisation: Normalisation, pool: str, device: torch.device, settings: EvaluateSettings,
            seed: int, features: dict[str, Path], first_row: int) -> dict[str, np.ndarray]:
    """One streaming pass over a split: per record, the hidden-pixel error of the model, of the random-init model and
    of the patch-mean predictor (masks fixed by `seed`, whatever the batch size) and the masked loss, returned; both
    encoders' features written to the `features` files (`mae`, `random_init`) from row `first_row` on, batch by
    batch, so they are never held. The per-record values are kept in arrays made before the pass: small per-batch
    results kept in lists would sit between the batches' large freed buffers and keep the allocator from returning
    them, so memory would grow with the split."""
    count = len(split)
    measured = {key: np.empty(count) for key in ("mse", "loss", "mse_random_init", "mse_patch_mean")}
    generator = torch.Generator().manual_seed(seed)
    for batch in loader(split.data, Batches(count, settings.batch_size), settings.workers, device):
        rows = batch["rows"].numpy()
        images = model_input(batch, normalisation, device)
        noise = torch.rand(len(images), model.patch_embed.num_patches, generator=generator)
        ours = reconstruct(model, images, noise, settings.mask_ratio, normalisation, batch_size=len(images))
        measured["mse"][rows] = ours.mse.cpu().numpy()
        measured["loss"][rows] = ours.loss.cpu().numpy()
        measured["mse_random_init"][rows] = reconstruct(baseline_model, images, noise, settings.mask_ratio,
                                                        normalisation, batch_size=len(images)).mse.cpu().numpy()
        measured["mse_patch_mean"][rows] = reconstruct(model, images, noise, settings.mask_ratio, normalisation,
                                                       patch_mean=True, batch_size=len(images)).mse.cpu().numpy()
        write_rows(features["mae"], first_row + rows, embed(model, images, pool, len(images)))
        write_rows(features["random_init"], first_row + rows, embed(baseline_model, images, pool, len(images)))
    return measured


def evaluate(params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"), layout: Layout = Layout(),
             log_to_mlflow: bool = True) -> EvalMetrics:
    params = load_params(params_path)
    settings = params.evaluate
    torch.set_num_threads(settings.threads)
    trained = load_trained(layout)
    model, dataset, normalisation = trained.model, trained.dataset, trained.normalisation
    card = load_card(card_path(dataset, cards_dir))
    attributes = [attr.name for attr in card.sensitive_attributes]
    splits = load_splits(layout, dataset, ["record_id", "dataset", "domain", *attributes, "label"])
    device = resolve_device(settings.device)
    model.to(device)
    baseline_model = random_model(trained.config, settings.seed).to(device)

    with layout.writing(layout.eval, EVAL_METRICS, EVAL_FIGURES) as staged:
        metrics = score_splits(model, baseline_model, dataset, splits, card, normalisation, trained.config.pool,
                               device, settings, layout, staged)
        write_json(staged(layout.eval_metrics_file), metrics)
        figures = [layout.eval_figures / path.name for path in grids(
            model.cpu(), splits, attributes, normalisation, settings, settings.mask_ratio, staged(layout.eval_figures))]
    _summarise(metrics)
    if log_to_mlflow:
        with model_run(layout.run_file) as mlflow:
            mlflow.log_metrics(flat_metrics(metrics.model_dump(mode="json"), "eval"))
            mlflow.log_artifact(str(layout.eval_metrics_file), "eval")
            mlflow.log_artifact(str(layout.samples_file), "eval")
            for path in figures:
                mlflow.log_artifact(str(path), "eval/figures")
    return metrics


def score_splits(model: MaskedAutoencoderViT, baseline_model: MaskedAutoencoderViT, dataset: str,
                 splits: dict[str, Split], card: DataCard, normalisation: Normalisation, pool: str,
                 device: torch.device, settings: EvaluateSettings, layout: Layout, staged: Staged) -> EvalMetrics:
    """Every split measured and the classifiers scored; writes the per-sample table and the features (into `staged`,
    the stage's temporary folders), and returns the metrics. What it holds per record (the table, the raw-pixel
    sample) goes when it returns, before the figures and MLflow's imports add their own memory. `pool` is the feature
    the logged encoder returns (pretrain took it from evaluate.pool)."""
    attributes = [attr.name for attr in card.sensitive_attributes]
    tables, raw, sampled, reconstruction = [], {}, {}, {}
    sizes = [len(split) for split in splits.values()]
    first_rows = dict(zip(splits, (int(row) for row in np.cumsum(sizes) - sizes)))  # each split's in the files
    staged(layout.embeddings_folder).mkdir()
    files = {kind: staged(layout.embeddings_file(kind)) for kind in ("mae", "random_init")}
    shape = (sum(sizes), MAEEncoder(model, pool).width)
    for path in files.values():  # made at full size, blocks reserved, nothing written yet (`write_rows` fills them)
        allocated(path, np.float32, shape)
    for offset, (name, split) in enumerate(splits.items()):
        measured = measure(model, baseline_model, split, normalisation, pool, device, settings, settings.seed + offset,
                           files, first_rows[name])
        table = split.records[["record_id", "dataset", "domain", *attributes, "label"]].copy()
        table.insert(2, "split", name)
        table["recon_mse"] = measured["mse"]
        table["psnr"] = psnr(table["recon_mse"].to_numpy())
        table["masked_loss"] = measured["loss"]
        table["recon_mse_random_init"] = measured["mse_random_init"]
        table["recon_mse_patch_mean"] = measured["mse_patch_mean"]
        tables.append(table)
        reconstruction[name] = {"count": len(table), "mse": table["recon_mse"].mean(),
                                "psnr": float(psnr(table["recon_mse"].mean())),
                                "masked_loss": table["masked_loss"].mean(),
                                "mse_random_init": table["recon_mse_random_init"].mean(),
                                "mse_patch_mean": table["recon_mse_patch_mean"].mean()}
        sampled[name] = raw_pixel_rows(len(split), settings, offset)
        raw[name] = raw_pixels(split.pixels, sampled[name], normalisation, settings.raw_pixels_size,
                               settings.batch_size)
        log.info("%s: %d images, hidden-pixel MSE %.4f (random init %.4f, patch mean %.4f)", name, len(table),
                 reconstruction[name]["mse"], reconstruction[name]["mse_random_init"],
                 reconstruction[name]["mse_patch_mean"])

    def features(kind: str, name: str) -> np.ndarray:
        if kind == "raw_pixels":
            return raw[name].copy()
        return NpyRows(files[kind])[first_rows[name]:first_rows[name] + len(splits[name])]

    missing = labelled(card, splits["train"].records)
    if missing:
        scores = {method: {"available": False, "reason": missing} for method in ("probe", "knn")}
        for table in tables:
            for method in ("probe", "knn"):
                table[f"{method}_pred"] = None
                for column in correct_columns(method):
                    table[column] = np.nan
        log.info("probe and kNN skipped: %s", missing)
    else:
        scores, predictions = representation_metrics(splits, features, sampled, settings)
        for method in ("probe", "knn"):
            scores[method]["available"] = True
        for table, name in zip(tables, splits):
            for method in ("probe", "knn"):
                table[f"{method}_pred"] = predictions[method]["mae"].get(name)  # None for the train rows
                for kind, column in zip(FEATURES, correct_columns(method)):
                    predicted = pd.Series(predictions[method][kind].get(name), index=table.index, dtype=object)
                    table[column] = correctness(predicted, table["label"])

    samples = pd.concat(tables, ignore_index=True)
    samples["embedding_row"] = np.arange(len(samples))
    samples.to_parquet(staged(layout.samples_file), index=False)
    side = splits["train"].pixels.shape[2]
    raw_metrics = {"dataset": dataset, "mask_ratio": settings.mask_ratio, "seed": settings.seed, "pool": pool,
                   "reconstruction": reconstruction, **scores,
                   "raw_pixels": {"max_images": settings.raw_pixels_images,
                                  "size": pooling(side, settings.raw_pixels_size)[1],
                                  "images": {name: len(rows) for name, rows in sampled.items()}}}
    # rounded, so the DVC metrics do not change with the last bits of a float sum
    return EvalMetrics.model_validate(json.loads(json.dumps(raw_metrics, default=float),
                                                 parse_float=lambda v: round(float(v), 6)))


def flat_metrics(tree: dict, prefix: str) -> dict[str, float]:
    """Numeric leaves as MLflow metric names (prefix.a.b); strings and flags are left to the JSON artifact."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}.{key}"
        if isinstance(value, dict):
            flat.update(flat_metrics(value, name))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value):
            flat[re.sub(r"[^A-Za-z0-9_./ -]", "_", name)] = float(value)
    return flat


def _summarise(metrics: EvalMetrics) -> None:
    test = metrics.reconstruction.get("test") or next(iter(metrics.reconstruction.values()))
    log.info("reconstruction (test): MSE %.4f, PSNR %.2f dB", test.mse, test.psnr)
    for method in ("probe", "knn"):
        entry: ClassifierScores = getattr(metrics, method)
        if not entry.available:
            log.info("%s: skipped (%s)", method, entry.reason)
            continue
        test = entry.test or {}
        log.info("%s top-1 (test): MAE %.3f, random init %.3f, raw pixels %.3f", method, test.get("mae", float("nan")),
                 test.get("random_init", float("nan")), test.get("raw_pixels", float("nan")))
