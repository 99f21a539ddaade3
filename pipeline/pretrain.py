"""The pretrain stage: train the MAE on a prepared train split and record it in MLflow with its lineage.

Writes models/mae/ (model.pt, config.json, run.json, reconstructions.png), metrics/pretrain.json (DVC
metrics) and metrics/pretrain_loss.csv (DVC plots). The train and val splits are read memory-mapped, in
batches (pipeline.data); the normalisation comes from one streaming pass over the train split. Resumable:
models/checkpoints/ persists across runs, and a checkpoint is used only when it was written for the same
params, data and world size.
"""

from __future__ import annotations

import csv
import logging
import random
from pathlib import Path

import numpy as np
import torch

from pipeline import PipelineError
from pipeline.artifacts import Layout, read_array, write_json
from pipeline.contracts import ModelConfig, PretrainMetrics
from pipeline.data import Batches, Draws, SplitPixels, loader, resolve_device
from pipeline.mae import PRESETS, MAEEncoder, MaskedAutoencoderViT
from pipeline.normalisation import Normalisation
from pipeline.params import DEFAULT_PARAMS, PretrainSettings, load_params
from pipeline.reconstruction import masking_noise, reconstruction_figure
from pipeline.tracking import StepMetrics, connect, lineage_tags, md5, quiet, silenced_stdout, write_run_file
from pipeline.train import State, fingerprint, init_world, masked_losses, train

log = logging.getLogger(__name__)

VAL_BATCH = 256  # held-out loss: batch size of the pass over the val split (the masks do not depend on it)


def seed_everything(seed: int, threads: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)
    torch.set_num_threads(threads)


def _start_run(mlflow, settings: PretrainSettings, state: State, params_flat: dict, tags: dict, datasets: list):
    """Open the model's run (the same run again when resuming) and record what trained it."""
    if state.run_id:
        return mlflow.start_run(run_id=state.run_id)
    mlflow.set_experiment(settings.experiment)
    run = mlflow.start_run(run_name=f"mae-{settings.preset}-{settings.dataset}")
    mlflow.log_params(params_flat)
    mlflow.set_tags(tags)
    for dataset, context in datasets:
        mlflow.log_input(dataset, context=context)
    return run


def pretrain(params_path: Path = DEFAULT_PARAMS, layout: Layout = Layout()) -> PretrainMetrics | None:
    quiet()
    params = load_params(params_path)
    settings = params.pretrain
    if settings.dataset not in params.datasets:
        raise PipelineError(f"{params_path}: pretrain.dataset: {settings.dataset!r} is not under datasets")
    if params.datasets[settings.dataset].image_size % settings.patch_size:
        raise PipelineError(f"{params_path}: pretrain.patch_size: {settings.patch_size} does not divide "
                            f"datasets.{settings.dataset}.image_size {params.datasets[settings.dataset].image_size}")
    world = init_world()
    seed_everything(settings.seed, settings.threads)
    device = resolve_device(settings.device)
    train_path, val_path = layout.split_pixels(settings.dataset, "train"), layout.split_pixels(settings.dataset, "val")
    train_data = SplitPixels(train_path, Draws(settings.seed, settings.patch_size, settings.augment))
    height, _, channels = train_data.pixels.shape[1:]
    model_args = dict(img_size=height, patch_size=settings.patch_size, in_chans=channels,
                      norm_pix_loss=settings.norm_pix_loss, **PRESETS[settings.preset])
    model = MaskedAutoencoderViT(**model_args).to(device)
    normalisation = Normalisation.fit(train_data.pixels)
    val = SplitPixels(val_path)
    val_batches = loader(val, Batches(len(val), VAL_BATCH), settings.workers, device, settings.prefetch)
    inputs = [train_path, layout.split_records(settings.dataset, "train"), val_path]
    run_fingerprint = fingerprint(settings, model_args, md5(inputs[0]), world.size)

    mlflow = connect() if world.main else None
    step_log = StepMetrics(mlflow)

    def on_start(state: State) -> None:
        if not world.main:
            return
        import pandas as pd

        records = pd.read_parquet(inputs[1])
        datasets = [
            (mlflow.data.from_numpy(read_array(inputs[0], mmap=True), source=str(inputs[0].resolve()),
                                    name=f"{settings.dataset}-train", digest=md5(inputs[0])[:8]), "training"),
            (mlflow.data.from_pandas(records, source=str(inputs[1].resolve()),
                                     name=f"{settings.dataset}-train-manifest", digest=md5(inputs[1])[:8]),
             "training"),
        ]
        tags = lineage_tags(inputs, [layout.provenance(settings.dataset)])
        params_flat = {**settings.model_dump(mode="json"), **{f"model.{k}": v for k, v in model_args.items()},
                       "world_size": world.size, "train_images": len(train_data)}
        resumed = state.run_id is not None
        with silenced_stdout():
            run = _start_run(mlflow, settings, state, params_flat, tags, datasets)
        state.run_id = run.info.run_id
        if resumed:
            step_log.resume(state.run_id)

    def on_step(step: int, values: dict) -> None:
        step_log.log(values, step)

    def on_epoch(state: State) -> None:
        val_loss, _ = masked_losses(model, val_batches, normalisation, settings.mask_ratio, settings.seed)
        state.history[-1]["val_loss"] = val_loss
        step_log.log({"epoch_train_loss": state.history[-1]["train_loss"], "val_masked_loss": val_loss,
                      "images_per_second": state.history[-1]["images_per_second"]}, state.epoch)

    state = train(model, train_data, normalisation, settings, layout.checkpoint, run_fingerprint, world, on_start,
                  on_step, on_epoch)
    if not world.main:
        return None
    return _finish(mlflow, step_log, model, model_args, settings, params.evaluate.pool, state, val_batches, val.pixels,
                   normalisation, layout, inputs)


def _finish(mlflow, step_log: StepMetrics, model, model_args, settings, pool: str, state, val_batches, val_pixels,
            normalisation: Normalisation, layout: Layout, inputs) -> PretrainMetrics:
    val_loss, baseline = masked_losses(model, val_batches, normalisation, settings.mask_ratio, settings.seed)
    metrics = PretrainMetrics(val_masked_loss=round(val_loss, 6), val_patch_mean_baseline=round(baseline, 6),
                              improvement_over_baseline=round(1 - val_loss / baseline, 6),
                              final_train_loss=round(state.history[-1]["train_loss"], 6), epochs=state.epoch,
                              steps=state.step)
    layout.model.mkdir(parents=True, exist_ok=True)
    model = model.cpu()
    torch.save(model.state_dict(), layout.weights_file)
    write_json(layout.config_file, ModelConfig(model=model_args, preset=settings.preset, mask_ratio=settings.mask_ratio,
                                               pool=pool, normalisation=normalisation.stats(), dataset=settings.dataset,
                                               train_md5=md5(inputs[0]), run_id=state.run_id))
    layout.pretrain_metrics_file.parent.mkdir(parents=True, exist_ok=True)
    write_json(layout.pretrain_metrics_file, metrics)
    with layout.loss_curve.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["epoch", "train_loss", "val_loss"])
        writer.writeheader()
        for row in state.history:
            writer.writerow({"epoch": row["epoch"], "train_loss": round(row["train_loss"], 6),
                             "val_loss": round(row.get("val_loss", float("nan")), 6)})

    shown = normalisation.normalise(val_pixels[:settings.figure_images])
    figure = reconstruction_figure(model, shown, masking_noise(len(shown), model.patch_embed.num_patches, settings.seed),
                                   normalisation, settings.mask_ratio, "validation images")
    figure.savefig(layout.reconstructions_figure, dpi=120)
    encoder = MAEEncoder(model, pool).eval()  # the feature evaluate and the audits judged
    example = normalisation.normalise(val_pixels[:2])
    with torch.no_grad():
        output = encoder(example)
    from mlflow.models import infer_signature

    with silenced_stdout():
        step_log.log({k if k.startswith("final_") else f"final_{k}": float(v) for k, v in dict(metrics).items()}, 0)
        mlflow.log_figure(figure, "figures/reconstructions.png")
        mlflow.log_artifact(str(layout.config_file))
        mlflow.log_artifact(str(layout.loss_curve))
        logged = mlflow.pytorch.log_model(encoder, name="encoder", input_example=example.numpy(),
                                 signature=infer_signature(example.numpy(), output.numpy()),
                                 pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "timm"],
                                 code_paths=[str(Path(__file__).parent)])
        run = mlflow.active_run()
        write_run_file(run, logged.model_uri, layout.run_file)
        mlflow.end_run()
    log.info("val masked-patch loss %.4f against the per-patch-mean baseline %.4f (%.0f%% lower); MLflow run %s",
             val_loss, baseline, 100 * metrics.improvement_over_baseline, state.run_id)
    return metrics
