"""A plugin with an encoder of its own: ``--plugin examples/plugin_encoder.py`` on any command.

Importing this file registers ``small_cnn``, a small convolutional encoder for images
``(C, H, W)``, with the same decorator as the built-in encoders. Nothing in mmbalance changes:

    mmbalance list small_cnn --plugin examples/plugin_encoder.py
    mmbalance compare --plugin examples/plugin_encoder.py --dataset features \\
        dataset.path=images.npz encoder.image=small_cnn --methods joint,ogm_ge --out runs/cnn

Every run records the plugin (its file and the SHA-256 of its source) in ``config.yaml`` and
``provenance.json``; ``mmbalance evaluate`` of such a run needs ``--plugin`` again (a run
directory never imports the code it names).

Run: ``python examples/plugin_encoder.py --out runs/plugin_encoder`` writes a small image
features file (digit images and a noisy vector per sample) and compares two methods on it
with ``small_cnn`` on the images (``--tiny``: seconds).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from mmbalance.errors import ConfigError
from mmbalance.models import ENCODERS


@ENCODERS.register("small_cnn")
class SmallCNN(nn.Module):
    """Two 3x3 convolutions with ReLU and max-pooling, then global average pooling.

    Args:
        channels: channels of the first convolution (the second has twice as many).
        out_dim: size of the latent.
    """

    def __init__(self, input_shape: Sequence[int], channels: int = 16, out_dim: int = 64) -> None:
        super().__init__()
        if len(input_shape) != 3:
            raise ConfigError(f"small_cnn needs (C, H, W) images, got {tuple(input_shape)}")
        self.net = nn.Sequential(
            nn.Conv2d(input_shape[0], channels, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(channels, 2 * channels, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(2 * channels, out_dim),
        )
        self.out_dim = out_dim  # every encoder says how wide its latent is

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def demo(out: str, tiny: bool = False) -> None:
    """Write digit images (8x8) with a second, noisy vector modality and compare two methods
    with ``small_cnn`` on the images, through the command line and this file as a plugin."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    n = 300 if tiny else len(digits.target)
    rng = np.random.default_rng(0)
    images = (digits.images[:n] / 16.0).astype(np.float32)[:, None]  # (N, 1, 8, 8)
    noisy = np.eye(10, dtype=np.float32)[digits.target[:n]] + rng.normal(0, 1.5, (n, 10))
    path = Path(out) / "images.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, image=images, vector=noisy.astype(np.float32), y=digits.target[:n])
    settings = ["train.epochs=1", "train.progress=false", "train.tensorboard=false"] if tiny else []
    command = [sys.executable, "-m", "mmbalance.cli", "compare", "--plugin", __file__]
    command += ["--dataset", "features", f"dataset.path={path}", "encoder.image=small_cnn"]
    command += ["--methods", "joint,ogm_ge", "--seeds", "1" if tiny else "3"]
    command += ["--out", str(Path(out) / "compare"), *settings]
    subprocess.run(command, check=True)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="compare two methods with a plugin encoder")
    parser.add_argument("--out", default="runs/plugin_encoder")
    parser.add_argument("--tiny", action="store_true", help="300 images, one epoch, one seed")
    args = parser.parse_args()
    demo(args.out, args.tiny)
