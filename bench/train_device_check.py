"""The pretraining loop on an accelerator: does train() run on CUDA, in fp32 and bf16, and how fast?

    python bench/train_device_check.py [--images 8192 --epochs 3]

Trains the params.yaml `pretrain` configuration on random 32x32 images (no data files needed) with
pipeline.train.train, once in fp32 and once with bf16 autocast, and prints images per second and the
final loss of each. Used for the GPU numbers in bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import yaml

from pipeline.mae import PRESETS, MaskedAutoencoderViT
from pipeline.params import PretrainSettings
from pipeline.train import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=8192)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = yaml.safe_load(Path("params.yaml").read_text())["pretrain"]
    images = torch.randn(args.images, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for bf16 in (False, True):
        settings = PretrainSettings.model_validate({**base, "epochs": args.epochs, "bf16": bf16,
                                                    "batch_size": args.batch_size, "checkpoint_every": 1000})
        torch.manual_seed(0)
        model = MaskedAutoencoderViT(img_size=32, patch_size=settings.patch_size, in_chans=3,
                                     norm_pix_loss=True, **PRESETS[settings.preset]).to(device)
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            state = train(model, images, settings, Path(folder) / "checkpoint.pt", "check")
            seconds = time.perf_counter() - start
        print(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu", "bf16": bf16,
                          "epochs": state.epoch, "final_train_loss": round(state.history[-1]["train_loss"], 4),
                          "images_per_second_last_epoch": round(state.history[-1]["images_per_second"]),
                          "wall_seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
