"""The pretrain stage: train the MAE on the prepared train splits of the datasets `pretrain.datasets` lists, each
epoch drawn from them by weight, and record it in MLflow with its lineage.

Writes models/mae/ (model.pt, config.json, run.json, reconstructions.png), metrics/pretrain.json (DVC
metrics) and metrics/pretrain_loss.csv (DVC plots). The splits are read by row, in batches (pipeline.data);
the normalisation comes from one streaming pass over every listed train split. The held-out loss and the figure use
the first listed dataset's val split, the dataset evaluate and the audits judge. Resumable: models/checkpoints/
persists across runs, and a checkpoint is used only when it was written for the same params, data and world size.
"""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path

import numpy as np
import torch

from pipeline import PipelineError
from pipeline.artifacts import PRETRAIN_LOSS, PRETRAIN_METRICS, Layout, read_array, write_json
from pipeline.cards import card_path, load_card
from pipeline.contracts import ModelConfig, PretrainMetrics, TrainedOn
from pipeline.data import Batches, Draws, NpyRows, SplitPixels, largest_remainder, loader, resolve_device
from pipeline.mae import PRESETS, MAEEncoder, MaskedAutoencoderViT
from pipeline.normalisation import Normalisation
from pipeline.params import DEFAULT_PARAMS, Params, PretrainSettings, load_params, training_datasets
from pipeline.policy import card_decision
from pipeline.reconstruction import masking_noise, reconstruction_figure
from pipeline.tracking import (
    StepMetrics,
    close_orphans,
    connect,
    ended_on_failure,
    lineage_tags,
    md5,
    quiet,
    silenced_stdout,
    workspace,
    write_run_file,
)
from pipeline.train import State, fingerprint, init_world, masked_losses, train

log = logging.getLogger(__name__)

VAL_BATCH = 256  # held-out loss: batch size of the pass over the val split (the masks do not depend on it)


def seed_everything(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(threads)


def _start_run(mlflow, settings: PretrainSettings, state: State, params_flat: dict, tags: dict, datasets: list):
    """Open the model's run (the same run again when resuming) and record what trained it; runs an earlier
    attempt in this workspace left RUNNING without a checkpoint to resume them from are ended KILLED."""
    if state.run_id:
        return mlflow.start_run(run_id=state.run_id)
    experiment = mlflow.set_experiment(settings.experiment)
    close_orphans(mlflow.MlflowClient(), experiment.experiment_id, tags["pipeline.workspace"])
    run = mlflow.start_run(run_name=f"mae-{settings.preset}-{'+'.join(d.name for d in settings.datasets)}")
    mlflow.log_params(params_flat)
    mlflow.set_tags(tags)
    for dataset, context, input_tags in datasets:
        mlflow.log_input(dataset, context=context, tags=input_tags)
    return run


def check_listed(params: Params, params_path: Path, cards_dir: Path) -> None:
    """What `pretrain.datasets` may list: datasets under `datasets` with one image size and channel count, that the
    patch size divides, and whose cards allow training under today's policy (`policy.card_decision`: a card that
    forbids training, or one whose consent basis the policy refuses, would have every record quarantined)."""
    first = training_datasets(params, params_path)[0]
    names = [entry.name for entry in params.pretrain.datasets]
    if first.image_size % params.pretrain.patch_size:
        raise PipelineError(f"{params_path}: pretrain.patch_size: {params.pretrain.patch_size} does not divide "
                            f"datasets.{names[0]}.image_size {first.image_size}")
    for name in names:
        card = load_card(card_path(name, cards_dir))
        verdict = card_decision(card, params.policy)
        if not verdict.accepted:
            field = "training_permission" if verdict.reason == "training_not_permitted" else "basis"
            raise PipelineError(f"{card_path(name, cards_dir)}: consent.{field}: "
                                f"{getattr(card.consent, field)!r} does not allow training under the policy "
                                f"({verdict.reason}), so pretrain.datasets in {params_path} cannot list {name}")


def trained_on(settings: PretrainSettings, layout: Layout) -> list[TrainedOn]:
    """Each listed dataset's train split with its share of an epoch's samples; an empty one cannot be drawn from."""
    paths = [layout.sealed(layout.split_pixels(entry.name, "train")) for entry in settings.datasets]
    sizes = NpyRows(paths).sizes
    shares = largest_remainder(sum(sizes), [entry.weight for entry in settings.datasets])
    for entry, path, size in zip(settings.datasets, paths, sizes):
        if not size:
            raise PipelineError(f"{path}: the train split is empty, so pretrain.datasets cannot list {entry.name}")
    return [TrainedOn(name=entry.name, weight=entry.weight, train_images=size, samples_per_epoch=share,
                      train_md5=md5(path))
            for entry, path, size, share in zip(settings.datasets, paths, sizes, shares)]


def pretrain(params_path: Path = DEFAULT_PARAMS, cards_dir: Path = Path("data_cards"),
             layout: Layout = Layout()) -> PretrainMetrics | None:
    quiet()
    params = load_params(params_path)
    settings = params.pretrain
    check_listed(params, params_path, cards_dir)
    world = init_world()
    seed_everything(settings.seed, settings.threads)
    device = resolve_device(settings.device)
    datasets = trained_on(settings, layout)
    evaluated = datasets[0].name
    train_paths = [layout.split_pixels(d.name, "train") for d in datasets]  # sealed: trained_on checked them
    train_data = SplitPixels(train_paths, Draws(settings.seed, settings.patch_size, settings.augment),
                             [d.weight for d in datasets])
    log.info("an epoch draws %s", ", ".join(f"{d.samples_per_epoch} samples of {d.name} ({d.train_images} images, "
                                            f"weight {d.weight:g})" for d in datasets))
    height, _, channels = train_data.pixels.shape[1:]
    model_args = dict(img_size=height, patch_size=settings.patch_size, in_chans=channels,
                      norm_pix_loss=settings.norm_pix_loss, **PRESETS[settings.preset])
    model = MaskedAutoencoderViT(**model_args).to(device)
    normalisation = Normalisation.fit(train_data.pixels)
    val_path = layout.sealed(layout.split_pixels(evaluated, "val"))
    val = SplitPixels(val_path)
    val_batches = loader(val, Batches(len(val), VAL_BATCH), settings.workers, device, settings.prefetch)
    monitored = min(len(val), settings.monitor_images or len(val))
    monitor_batches = loader(val, Batches(monitored, VAL_BATCH), settings.workers, device, settings.prefetch)
    records_paths = [layout.sealed(layout.split_records(d.name, "train")) for d in datasets]
    inputs = [path for pair in zip(train_paths, records_paths) for path in pair] + [val_path]
    run_fingerprint = fingerprint(settings, model_args, ",".join(d.train_md5 for d in datasets), world.size)

    mlflow = connect() if world.main else None
    step_log = StepMetrics(mlflow)

    def on_start(state: State) -> None:
        if not world.main:
            return
        import pandas as pd

        provenances = [layout.provenance(d.name) for d in datasets]
        logged = []
        for d, provenance, pixels, records in zip(datasets, provenances, train_paths, records_paths):
            shared = {"card_sha256": provenance.card.sha256, "weight": f"{d.weight:g}",
                      "samples_per_epoch": str(d.samples_per_epoch)}
            records_md5 = md5(records)
            logged += [
                (mlflow.data.from_numpy(read_array(pixels, mmap=True), source=str(pixels.resolve()),
                                        name=f"{d.name}-train", digest=d.train_md5[:8]), "training",
                 {**shared, "data_md5": d.train_md5}),
                (mlflow.data.from_pandas(pd.read_parquet(records), source=str(records.resolve()),
                                         name=f"{d.name}-train-manifest", digest=records_md5[:8]), "training",
                 {**shared, "data_md5": records_md5}),
            ]
        tags = {**lineage_tags(inputs, provenances), "pipeline.workspace": workspace(layout.root)}
        params_flat = {**settings.model_dump(mode="json"), **{f"model.{k}": v for k, v in model_args.items()},
                       "world_size": world.size, "train_images": len(train_data)}
        resumed = state.run_id is not None
        with silenced_stdout():
            run = _start_run(mlflow, settings, state, params_flat, tags, logged)
        state.run_id = run.info.run_id
        if resumed:
            step_log.resume(state.run_id)

    def on_step(step: int, values: dict) -> None:
        step_log.log(values, step)

    def on_epoch(state: State) -> None:
        val_loss, _ = masked_losses(model, monitor_batches, normalisation, settings.mask_ratio, settings.seed)
        state.history[-1]["val_loss"] = val_loss
        step_log.log({"epoch_train_loss": state.history[-1]["train_loss"], "val_masked_loss": val_loss,
                      "images_per_second": state.history[-1]["images_per_second"]}, state.epoch)

    with ended_on_failure(mlflow):
        state = train(model, train_data, normalisation, settings, layout.checkpoint, run_fingerprint, world,
                      on_start, on_step, on_epoch)
        if not world.main:
            return None
        return _finish(mlflow, step_log, model, model_args, settings, params.evaluate.pool, state, val_batches,
                       val.pixels, normalisation, layout, datasets)


def _finish(mlflow, step_log: StepMetrics, model, model_args, settings, pool: str, state, val_batches, val_pixels,
            normalisation: Normalisation, layout: Layout, datasets: list[TrainedOn]) -> PretrainMetrics:
    val_loss, baseline = masked_losses(model, val_batches, normalisation, settings.mask_ratio, settings.seed)
    metrics = PretrainMetrics(val_masked_loss=round(val_loss, 6), val_patch_mean_baseline=round(baseline, 6),
                              improvement_over_baseline=round(1 - val_loss / baseline, 6),
                              final_train_loss=round(state.history[-1]["train_loss"], 6), epochs=state.epoch,
                              steps=state.step)
    with layout.writing(layout.model, PRETRAIN_METRICS, PRETRAIN_LOSS) as staged:
        model = model.cpu()
        torch.save(model.state_dict(), staged(layout.weights_file))
        write_json(staged(layout.config_file), ModelConfig(
            model=model_args, preset=settings.preset, mask_ratio=settings.mask_ratio, pool=pool,
            normalisation=normalisation.stats(), dataset=datasets[0].name, datasets=datasets, run_id=state.run_id))
        write_json(staged(layout.pretrain_metrics_file), metrics)
        with staged(layout.loss_curve).open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["epoch", "train_loss", "val_loss"])
            writer.writeheader()
            for row in state.history:
                writer.writerow({"epoch": row["epoch"], "train_loss": round(row["train_loss"], 6),
                                 "val_loss": round(row.get("val_loss", float("nan")), 6)})

        shown = normalisation.normalise(val_pixels[:settings.figure_images])
        noise = masking_noise(len(shown), model.patch_embed.num_patches, settings.seed)
        figure = reconstruction_figure(model, shown, noise, normalisation, settings.mask_ratio, "validation images")
        figure.savefig(staged(layout.reconstructions_figure), dpi=120)
        encoder = MAEEncoder(model, pool).eval()  # the feature evaluate and the audits judged
        example = normalisation.normalise(val_pixels[:2])
        with torch.no_grad():
            output = encoder(example)
        from mlflow.models import infer_signature

        with silenced_stdout():
            step_log.log({k if k.startswith("final_") else f"final_{k}": float(v)
                          for k, v in dict(metrics).items()}, 0)
            mlflow.log_figure(figure, "figures/reconstructions.png")
            mlflow.log_artifact(str(staged(layout.config_file)))
            mlflow.log_artifact(str(staged(layout.loss_curve)))
            logged = mlflow.pytorch.log_model(encoder, name="encoder", input_example=example.numpy(),
                                              signature=infer_signature(example.numpy(), output.numpy()),
                                              pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm"],
                                              code_paths=[str(Path(__file__).parent)])
            run = mlflow.active_run()
            write_run_file(run, logged.model_uri, staged(layout.run_file))
            mlflow.end_run()
    log.info("val masked-patch loss %.4f against the per-patch-mean baseline %.4f (%.0f%% lower); MLflow run %s",
             val_loss, baseline, 100 * metrics.improvement_over_baseline, state.run_id)
    return metrics
