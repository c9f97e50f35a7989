"""``synthetic``: a Gaussian-mixture multimodal benchmark whose Bayes accuracy is known.

Following the MCR paper's synthetic recipe, each sample has a label ``y`` (uniform over ``C``
classes) and a *type*: ``shared`` (every modality carries the label) or ``unique to modality m``
(only modality m does). Modality m has a latent ``h_m = s_m * mu_m[y] * [type carries y for m] +
N(0, I)`` with class means ``mu_m[y] ~ N(0, I)`` (drawn once) and signal strength ``s_m``; it is observed through a
fixed random *invertible* lift ``x_m = g_m(h_m)`` (a linear map to a higher dimension followed by
``depth_m - 1`` square layers, each followed by a leaky ReLU). A deeper lift makes a modality
harder to learn without changing how much information it carries.

Because the lift is injective, ``p(y | x) = p(y | h)``, which is an exact mixture posterior over
types; the Bayes accuracy ``E[max_y p(y | h)]`` is estimated on a large fresh sample and every
result can be reported as a gap to it.

With ``task=regression`` the target is the centred class index (MOSI-style scoring: MAE,
correlation, and binary accuracy of its sign).

Two presets (``preset``) fill in ``shares``, ``signal``, ``depth`` and ``leak``; values given
explicitly always win:

* ``default``: the regime in which joint training falls below the unimodal ensemble (measured
  in the project's research notes): strong modality 1 (signal 3, depth 1, 70 % unique samples),
  weak modality 2 (signal 1, depth 4, 20 % unique), 10 % shared, leak 0.2. Modality 2 carries
  the label in only 30 % of the samples, so its encoder has little to learn: its linear-probe
  accuracy is about the same (~0.36) whatever the method, and an untrained encoder gives about
  that too. Not suited to showing that a balancing method trains the weak encoder better.
* ``competition`` (two modalities only): 80 % shared, 15 % unique to modality 1, 5 % unique to
  modality 2; signal 3 and 1; depth 1 and 6 with leak 0.02 (a strongly nonlinear lift of
  modality 2). Modality 1 is easy and alone gives ~0.96 accuracy, modality 2 carries the label
  in 85 % of the samples but is hard to learn. Under ``joint`` the fused loss is minimised
  through modality 1 and the modality-2 encoder stays under-trained: its probe accuracy is
  ~0.64, against ~0.68 when it is trained alone (``unimodal``, ``method.modality=m2``) and
  ~0.62 for an untrained encoder (3 seeds, ``benchmarks/find_regime.py``). This is the regime
  in which balancing methods can show that they train the weak encoder better.

Both use 1000 training samples and SGD (lr 0.02, momentum 0.9, 40 epochs, batch 32).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from mmbalance.config import check
from mmbalance.data.base import (
    DATASETS,
    DatasetBundle,
    DatasetSource,
    ModalitySpec,
    MultimodalTensorDataset,
)

# preset -> number of modalities -> values of the per-modality lists and of ``leak``
_PRESETS: dict[str, dict[int, dict[str, object]]] = {
    "default": {
        2: {"shares": [0.1, 0.7, 0.2], "signal": [3.0, 1.0], "depth": [1, 4], "leak": 0.2},
        3: {
            "shares": [0.1, 0.6, 0.2, 0.1],
            "signal": [3.0, 1.0, 1.0],
            "depth": [1, 4, 4],
            "leak": 0.2,
        },
    },
    "competition": {
        2: {"shares": [0.8, 0.15, 0.05], "signal": [3.0, 1.0], "depth": [1, 6], "leak": 0.02},
    },
}


@dataclass
class SyntheticParams:
    """Options of the synthetic benchmark (lists are per modality; ``shares`` starts with shared).

    Attributes:
        num_modalities: number of modalities M (m1, m2, ...).
        num_classes: number of classes C, equally likely.
        shares: M + 1 sample-type probabilities: shared (every modality carries the label),
            then unique to m1, m2, ...; they sum to 1 (null: from the preset).
        signal: per-modality signal strength s_m of the class means (null: from the preset).
        depth: per-modality depth of the invertible lift; deeper is harder to learn, with the
            same information (null: from the preset).
        latent_dim: dimension of each modality's latent h_m.
        input_dim: dimension of each observed input x_m (at least latent_dim).
        n_train: training samples.
        n_val: validation samples.
        n_test: test samples.
        n_bayes: fresh samples that estimate the Bayes accuracy.
        seed: draws the class means, the lifts and the samples.
        leak: slope of the leaky ReLUs in the lifts, in (0, 1) (null: from the preset).
        task: ``classification``, or ``regression`` on the centred class index.
        preset: the regime that fills in shares, signal, depth and leak (see the module
            docstring); values given explicitly win.
    """

    num_modalities: int = 2
    num_classes: int = 5
    shares: list[float] | None = None
    signal: list[float] | None = None
    depth: list[int] | None = None
    latent_dim: int = 8
    input_dim: int = 64
    n_train: int = 1000
    n_val: int = 1000
    n_test: int = 10000
    n_bayes: int = 200000
    seed: int = 0
    leak: float | None = None
    task: Literal["classification", "regression"] = "classification"
    preset: Literal["default", "competition"] = "default"

    def __post_init__(self) -> None:
        m = self.num_modalities
        check(m >= 2, f"dataset.num_modalities must be >= 2, got {m}")
        check(self.num_classes >= 2, "dataset.num_classes must be >= 2")
        check(self.preset in _PRESETS, f"dataset.preset must be one of {list(_PRESETS)}")
        defaults = _PRESETS[self.preset].get(m)
        if self.leak is None:
            self.leak = float(defaults["leak"]) if defaults is not None else 0.2  # type: ignore[arg-type]
        for key, length in (("shares", m + 1), ("signal", m), ("depth", m)):
            value = getattr(self, key)
            if value is None:
                check(
                    defaults is not None,
                    f"dataset.{key} must be given for num_modalities={m} with "
                    f"dataset.preset={self.preset} (a list of {length})",
                )
                value = list(defaults[key])  # type: ignore[index]
                setattr(self, key, value)
            check(len(value) == length, f"dataset.{key} needs {length} values, got {len(value)}")
        assert self.shares is not None and self.signal is not None and self.depth is not None
        check(all(p >= 0 for p in self.shares), "dataset.shares must be non-negative")
        check(abs(sum(self.shares) - 1) < 1e-6, f"dataset.shares must sum to 1, got {self.shares}")
        check(all(s >= 0 for s in self.signal), "dataset.signal must be non-negative")
        check(all(d >= 1 for d in self.depth), "dataset.depth values must be >= 1")
        check(self.input_dim >= self.latent_dim, "dataset.input_dim must be >= latent_dim")
        check(0 < self.leak < 1, "dataset.leak must be in (0, 1) for the lift to be invertible")
        for key in ("n_val", "n_test", "n_bayes", "latent_dim"):
            check(getattr(self, key) >= 1, f"dataset.{key} must be >= 1")
        # a benchmark that fits in memory: at most 10 million samples per split, 10,000 classes,
        # 100 modalities and 100,000 input dimensions
        for key, most in (
            ("n_train", 10**7),
            ("n_val", 10**7),
            ("n_test", 10**7),
            ("n_bayes", 10**7),
            ("num_classes", 10**4),
            ("num_modalities", 100),
            ("input_dim", 10**5),
        ):
            value = getattr(self, key)
            check(value <= most, f"dataset.{key} must be <= {most:,}, got {value}")
        check(all(d <= 1000 for d in self.depth), "dataset.depth values must be <= 1000")
        # the inputs are standardised with the training split's mean and standard deviation
        check(self.n_train >= 2, f"dataset.n_train must be >= 2, got {self.n_train}")


class SyntheticProcess:
    """The generating process: class means, lifts, sampling and the exact posterior."""

    def __init__(self, p: SyntheticParams) -> None:
        assert p.shares is not None and p.signal is not None and p.depth is not None
        self.p = p
        gen = torch.Generator().manual_seed(10_000 + p.seed)
        m, c, d = p.num_modalities, p.num_classes, p.latent_dim
        self.means = torch.randn(m, c, d, generator=gen, dtype=torch.float64)
        self.signal = torch.tensor(p.signal, dtype=torch.float64)
        self.shares = torch.tensor(p.shares, dtype=torch.float64)
        # carries[t, m]: does type t (0 = shared, 1 + m = unique to m) carry the label in m?
        carries = torch.zeros(m + 1, m, dtype=torch.float64)
        carries[0] = 1
        carries[1:] = torch.eye(m, dtype=torch.float64)
        self.carries = carries
        self.lifts: list[list[Tensor]] = []
        for depth in p.depth:
            layers = [torch.randn(d, p.input_dim, generator=gen) / math.sqrt(d)]
            layers += [
                torch.randn(p.input_dim, p.input_dim, generator=gen) / math.sqrt(p.input_dim)
                for _ in range(depth - 1)
            ]
            self.lifts.append(layers)

    def sample(self, n: int, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """Draw ``n`` samples: latents ``(M, n, d)``, labels ``(n,)`` and types ``(n,)``."""
        p = self.p
        y = torch.randint(p.num_classes, (n,), generator=gen)
        types = torch.multinomial(self.shares, n, replacement=True, generator=gen)
        noise = torch.randn(p.num_modalities, n, p.latent_dim, generator=gen, dtype=torch.float64)
        scale = (self.carries[types].T * self.signal[:, None])[..., None]  # (M, n, 1)
        return noise + scale * self.means[:, y], y, types

    def lift(self, modality: int, h: Tensor) -> Tensor:
        x = h.float()
        for w in self.lifts[modality]:
            x = torch.nn.functional.leaky_relu(x @ w, self.p.leak)
        return x

    def log_posterior(self, h: Tensor) -> Tensor:
        """Exact ``log p(y | h)`` for latents ``(M, n, d)``: a mixture over sample types."""
        # log N(h_m; a * s_m * mu_m[y], I) up to a constant shared by all (y, t):
        # a * (s <h, mu> - s^2 |mu|^2 / 2) with a in {0, 1}.
        s = self.signal[:, None, None]
        dots = torch.einsum("mnd,mcd->mnc", h, self.means)  # (M, n, C)
        per_modality = s * dots - 0.5 * s**2 * (self.means**2).sum(-1)[:, None, :]
        # loglik[t, n, c] = sum_m carries[t, m] * per_modality[m, n, c]
        loglik = torch.einsum("tm,mnc->tnc", self.carries, per_modality)
        log_prior = torch.log(self.shares.clamp_min(1e-300))[:, None, None]
        joint = torch.logsumexp(loglik + log_prior, dim=0)  # (n, C)
        return joint - torch.logsumexp(joint, dim=1, keepdim=True)

    def bayes_accuracy(self, n: int, seed: int) -> float:
        """``E[max_y p(y|h)]`` on ``n`` fresh samples: the accuracy of the Bayes classifier."""
        gen = torch.Generator().manual_seed(seed)
        total, done = 0.0, 0
        while done < n:
            k = min(50_000, n - done)
            h, _, _ = self.sample(k, gen)
            total += self.log_posterior(h).exp().max(dim=1).values.sum().item()
            done += k
        return total / n


@DATASETS.register("synthetic")
class SyntheticSource(DatasetSource):
    Params = SyntheticParams
    description = "Gaussian-mixture modalities behind invertible random lifts; Bayes accuracy known"
    train_defaults = {
        "optimizer": "sgd",
        "lr": 0.02,
        "momentum": 0.9,
        "epochs": 40,
        "batch_size": 32,
    }

    def build(self) -> DatasetBundle:
        p: SyntheticParams = self.params
        process = SyntheticProcess(p)
        names = [f"m{i + 1}" for i in range(p.num_modalities)]
        raw = {}
        for k, (split, n) in enumerate(
            (("train", p.n_train), ("val", p.n_val), ("test", p.n_test))
        ):
            gen = torch.Generator().manual_seed(p.seed * 1000 + k)
            h, y, _ = process.sample(n, gen)
            raw[split] = ({name: process.lift(i, h[i]) for i, name in enumerate(names)}, y)
        # Standardise each input feature with training statistics (an invertible affine map, so
        # the Bayes accuracy is unchanged) to keep modalities on comparable scales.
        stats = {m: (x.mean(0), x.std(0).clamp_min(1e-6)) for m, x in raw["train"][0].items()}
        splits = {
            split: MultimodalTensorDataset(
                {m: (x - stats[m][0]) / stats[m][1] for m, x in inputs.items()}, y
            )
            for split, (inputs, y) in raw.items()
        }
        bayes: float | None = None
        if p.task == "classification":
            bayes = process.bayes_accuracy(p.n_bayes, seed=p.seed * 1000 + 99)
        else:  # regression target: the class index, centred so that its sign is meaningful
            centre = (p.num_classes - 1) / 2
            for split, dataset in splits.items():
                splits[split] = MultimodalTensorDataset(
                    dataset.inputs, dataset.targets.float() - centre
                )
        specs = {
            name: ModalitySpec(name, (p.input_dim,), "mlp", {"hidden": [128, 128], "out_dim": 64})
            for name in names
        }
        return DatasetBundle(
            name="synthetic",
            task=p.task,
            num_outputs=p.num_classes if p.task == "classification" else 1,
            modalities=specs,
            splits=splits,
            bayes_accuracy=bayes,
            notes=f"Bayes accuracy estimated on {p.n_bayes} fresh samples" if bayes else "",
        )
