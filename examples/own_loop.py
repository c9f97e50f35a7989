"""Methods that need more than your model's outputs, in your own loop: mcr, ogm_ge, opm, mmpareto.

``examples/plain_pytorch.py`` covers the methods that only read a forward pass's outputs. These
four need parts of the model itself: OGM-GE and OPM re-evaluate your fusion on altered latents
to score each modality, MCR evaluates it with stop-gradients and trains a head of its own (the
CEB head, with ``lam_ceb > 0``), MMPareto and OGM-GE rewrite your encoders' gradients, OPM drops
latents before your classifier. :class:`mmbalance.methods.MethodAdapter` builds all of that from
your model in one call; the loop below is yours, with every hook of a training step in view.

Run: ``python examples/own_loop.py [METHOD ...]`` (default: all four).
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from mmbalance.methods import MethodAdapter, build_method

CLASSES = 4

#: The options each method runs with here. MCR's CEB term (lam_ceb > 0) gives the method a
#: trainable module of its own; OPM's journal warm-up (6 epochs) is longer than this toy run.
OPTIONS: dict[str, dict[str, object]] = {
    "mcr": {"lam_ceb": 0.1},
    "ogm_ge": {"alpha": 0.8},
    "opm": {"warmup_epochs": 0},
    "mmpareto": {},
}


class AudioVisualNet(nn.Module):
    """A user's own model: an encoder per modality, a classifier on the concatenated latents
    and one linear head per modality (which mcr and mmpareto train too)."""

    def __init__(self, latent: int = 16) -> None:
        super().__init__()
        self.audio = nn.Sequential(nn.Linear(12, 32), nn.ReLU(), nn.Linear(32, latent))
        self.video = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, latent))
        self.classifier = nn.Linear(2 * latent, CLASSES)
        self.audio_head = nn.Linear(latent, CLASSES)
        self.video_head = nn.Linear(latent, CLASSES)

    def fuse(self, latents: dict[str, Tensor]) -> Tensor:
        """The fusion: logits from the latents of both modalities."""
        return self.classifier(torch.cat([latents["audio"], latents["video"]], dim=1))


def toy_data(n: int, seed: int) -> tuple[dict[str, Tensor], Tensor]:
    """A strong audio modality and a weak video one (class means in noise, fixed by ``seed``)."""
    gen = torch.Generator().manual_seed(seed)
    means = torch.randn(2, CLASSES, 12, generator=torch.Generator().manual_seed(1234))
    y = torch.randint(CLASSES, (n,), generator=gen)
    audio = 1.2 * means[0, y] + torch.randn(n, 12, generator=gen)
    video = 0.6 * means[1, y, :8] + torch.randn(n, 8, generator=gen)
    return {"audio": audio, "video": video}, y


def train(method_name: str, epochs: int = 8, seed: int = 0) -> dict[str, object]:
    """Train with ``method_name`` in a plain loop; returns the test accuracy, the last step's
    loss terms and the per-step scalars the method logged."""
    torch.manual_seed(seed)
    train_x, train_y = toy_data(600, seed)
    test_x, test_y = toy_data(400, seed + 1)
    model = AudioVisualNet()
    method = build_method(method_name, OPTIONS[method_name])
    # One call: the method's set-up (and its own module), the fusion with stop-gradients, the
    # encoders' parameters, the unimodal heads.
    adapter = MethodAdapter(
        method,
        model,
        encoders={"audio": model.audio, "video": model.video},
        fusion=model.fuse,
        unimodal_heads={"audio": model.audio_head, "video": model.video_head},
        num_outputs=CLASSES,
        latent_dims={"audio": 16, "video": 16},
    )
    # named groups: your model's parameters and the method's module (mcr's CEB head)
    optimizer = torch.optim.SGD(adapter.param_groups(), lr=0.05, momentum=0.9)
    logs: list[dict[str, float]] = []
    losses: dict[str, Tensor] = {}
    batch = 50
    for epoch in range(epochs):
        adapter.begin_epoch(epoch, optimizer)
        model.train()
        order = torch.randperm(len(train_y))
        for start in range(0, len(order), batch):
            rows = order[start : start + batch]
            inputs = {m: x[rows] for m, x in train_x.items()}
            ctx = adapter.context(train_y[rows], inputs, epoch)
            optimizer.zero_grad()
            output = adapter.forward(inputs, ctx)  # encoders, the method's latent transform, heads
            losses = method.losses(output, ctx)  # named loss terms
            method.backward(losses, ctx)  # mmpareto: its own per-encoder gradient combination
            method.rewrite_gradients(ctx)  # ogm_ge: modulation coefficient and noise
            optimizer.step()
            logs.append({k: float(v) for k, v in ctx.logs.items()})
        adapter.end_epoch(epoch)
    accuracy = (adapter.predict(test_x).argmax(1) == test_y).float().mean().item()
    return {
        "test_accuracy": accuracy,
        "losses": {k: float(v.detach()) for k, v in losses.items()},
        "logs": logs,
        "method_module": adapter.method_module,
    }


if __name__ == "__main__":
    for name in sys.argv[1:] or list(OPTIONS):
        result = train(name)
        terms = ", ".join(f"{k} {v:.3f}" for k, v in result["losses"].items())  # type: ignore[union-attr]
        print(
            f"{name}: test accuracy {result['test_accuracy']:.3f} (chance 0.25); last losses: {terms}"
        )
