"""Use an mmbalance method inside your own PyTorch loop, with your own model.

Your network only has to produce a :class:`mmbalance.models.ModelOutput` (fused logits,
per-modality latents and, if the method needs them, unimodal logits). The method then supplies
its loss terms and, if it has them, its backward and gradient rewriting. Methods that also need
the fusion head, the encoders' parameters or a module of their own (mcr, ogm_ge, opm, mmpareto)
are set up on your model by :class:`mmbalance.methods.MethodAdapter`: see
``examples/own_loop.py``.

Run: ``python examples/plain_pytorch.py``
"""

from __future__ import annotations

import torch
from torch import nn

from mmbalance.methods import METHODS, StepContext, build_method
from mmbalance.models import ModelOutput


class TwoTowerNet(nn.Module):
    """A user's own audio-visual model: two encoders, concatenation, one classifier."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(10, 16), nn.ReLU())
        self.video = nn.Sequential(nn.Linear(6, 16), nn.ReLU())
        self.classifier = nn.Linear(32, classes)
        self.audio_head = nn.Linear(16, classes)  # unimodal heads, for methods that use them
        self.video_head = nn.Linear(16, classes)

    def forward(self, audio: torch.Tensor, video: torch.Tensor) -> ModelOutput:
        za, zv = self.audio(audio), self.video(video)
        return ModelOutput(
            logits=self.classifier(torch.cat([za, zv], dim=1)),
            latents={"audio": za, "video": zv},
            unimodal_logits={"audio": self.audio_head(za), "video": self.video_head(zv)},
        )


def train(method_name: str = "multiloss", steps: int = 200, seed: int = 0) -> float:
    """Train on a toy task with the given method; return the final training accuracy."""
    torch.manual_seed(seed)
    n, classes = 256, 3
    y = torch.randint(classes, (n,))
    audio = torch.randn(n, 10) + nn.functional.one_hot(y, 10).float() * 1.5
    video = torch.randn(n, 6) + nn.functional.one_hot(y, 6).float() * 0.5
    model = TwoTowerNet(classes)
    method = build_method(method_name, {})
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    encoder_params = {
        "audio": list(model.audio.parameters()),
        "video": list(model.video.parameters()),
    }
    for step in range(steps):
        output = model(audio, video)
        ctx = StepContext.standalone(y, encoder_params=encoder_params, step=step)
        losses = method.losses(output, ctx)  # named loss terms
        optimizer.zero_grad()
        method.backward(losses, ctx)  # default: backward of their sum
        method.rewrite_gradients(ctx)  # e.g. gradient modulation; no-op for most methods
        optimizer.step()
    with torch.no_grad():
        prediction = method.predict(model(audio, video))
    return (prediction.argmax(1) == y).float().mean().item()


if __name__ == "__main__":
    for name in ("joint", "multiloss"):
        print(f"{name}: training accuracy {train(name):.3f}")
    print("registered methods:", ", ".join(METHODS.names()))
