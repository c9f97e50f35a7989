"""Per-modality encoders: map one modality's input to a pooled latent ``(B, out_dim)``.

Every encoder has an ``out_dim`` attribute and checks the shape of its input, so a wrong tensor
fails with a message naming the modality instead of a matrix-multiply error deep inside.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from mmbalance.errors import ConfigError, DataError, shown
from mmbalance.models import ENCODERS


def _expect(x: Tensor, shape: Sequence[int | None], what: str) -> None:
    """Raise a DataError unless ``x`` is ``(B, *shape)`` (``None`` entries match any size)."""
    ok = x.dim() == len(shape) + 1 and all(
        s is None or s == a for s, a in zip(shape, x.shape[1:], strict=True)
    )
    if not ok:
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise DataError(f"{what} got input of shape {tuple(x.shape)}, expected (B, {want})")


class MLPEncoder(nn.Module):
    """Flattened input -> ``hidden`` ReLU layers -> ``out_dim`` features.

    Args:
        hidden: widths of the hidden layers, each followed by a ReLU ([]: one linear map).
        out_dim: size of the latent.
    """

    def __init__(
        self, input_shape: Sequence[int], hidden: Sequence[int] = (128, 128), out_dim: int = 64
    ) -> None:
        super().__init__()
        self.input_shape = tuple(input_shape)
        dims = [int(torch.tensor(self.input_shape).prod()), *list(hidden)]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers += [nn.Linear(dims[-1], out_dim)]
        self.net = nn.Sequential(*layers)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        _expect(x, self.input_shape, "mlp encoder")
        return self.net(x.flatten(1))


class BasicBlock(nn.Module):
    """The two-conv residual block of ResNet-18."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18Encoder(nn.Module):
    """ResNet-18 (BasicBlock [2, 2, 2, 2]) with configurable width and input channels.

    Accepts an image ``(B, C, H, W)`` (a spectrogram is a 1-channel image) or, when ``frames`` is
    set, a clip ``(B, C, T, H, W)``: frames are folded into the batch and the features are averaged
    over time and space (TSN-style, as in the OGM-GE / MCR code). ``width=64`` is the standard
    512-d network; ``small_input=True`` replaces the 7x7/stride-2 stem and max-pool by a 3x3
    stride-1 stem, which suits 8x8..64x64 inputs.

    Args:
        width: channels of the first stage (the latent has 8 * width; 64: the standard 512-d
            ResNet-18).
        small_input: a 3x3 stride-1 stem without max-pooling, for inputs of 8x8 to 64x64.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        width: int = 64,
        small_input: bool = False,
    ) -> None:
        super().__init__()
        if width < 1:
            raise ConfigError(f"resnet18 width must be >= 1, got {width}")
        self.input_shape = tuple(input_shape)
        if len(self.input_shape) not in (3, 4):
            raise ConfigError(
                f"resnet18 needs (C, H, W) or (C, T, H, W) inputs, got {self.input_shape}"
            )
        cin = self.input_shape[0]
        if small_input:
            self.stem = nn.Sequential(
                nn.Conv2d(cin, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()
            )
        else:
            self.stem = nn.Sequential(
                nn.Conv2d(cin, width, 7, 2, 3, bias=False),
                nn.BatchNorm2d(width),
                nn.ReLU(),
                nn.MaxPool2d(3, 2, 1),
            )
        widths = [width, 2 * width, 4 * width, 8 * width]
        blocks: list[nn.Module] = []
        cprev = width
        for i, w in enumerate(widths):
            stride = 1 if i == 0 else 2
            blocks += [BasicBlock(cprev, w, stride), BasicBlock(w, w, 1)]
            cprev = w
        self.layers = nn.Sequential(*blocks)
        self.out_dim = widths[-1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        _expect(x, (self.input_shape[0],) + (None,) * (len(self.input_shape) - 1), "resnet18")
        if x.dim() == 5:  # (B, C, T, H, W) -> (B*T, C, H, W)
            b, c, t, h, w = x.shape
            feats = self.layers(self.stem(x.transpose(1, 2).reshape(b * t, c, h, w)))
            return feats.reshape(b, t, self.out_dim, -1).mean(dim=(1, 3))
        return self.layers(self.stem(x)).mean(dim=(2, 3))


class SequenceTransformerEncoder(nn.Module):
    """A small Transformer over a feature sequence ``(B, L, F)`` (MOSI-style), mean-pooled.

    Args:
        d_model: width of the tokens (each feature vector is projected to it).
        heads: attention heads (must divide d_model).
        layers: transformer layers.
        dropout: dropout inside the transformer layers.
        out_dim: size of the latent, through a final linear map; null: d_model, no map.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        d_model: int = 40,
        heads: int = 4,
        layers: int = 2,
        dropout: float = 0.1,
        out_dim: int | None = None,
    ) -> None:
        super().__init__()
        if len(input_shape) != 2:
            raise ConfigError(f"sequence_transformer needs (L, F) inputs, got {tuple(input_shape)}")
        if d_model % heads:
            raise ConfigError(f"d_model={d_model} is not divisible by heads={heads}")
        self.input_shape = tuple(input_shape)
        self.project = nn.Linear(input_shape[1], d_model)
        self.position = nn.Parameter(torch.randn(1, input_shape[0], d_model) * 0.02)
        layer = nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=4 * d_model, dropout=dropout, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out: nn.Module = nn.Identity() if out_dim is None else nn.Linear(d_model, out_dim)
        self.out_dim = d_model if out_dim is None else out_dim

    def forward(self, x: Tensor) -> Tensor:
        _expect(x, (None, self.input_shape[1]), "sequence_transformer")
        length = x.shape[1]
        if length > self.position.shape[1]:
            raise DataError(
                f"sequence of length {length} is longer than the {self.position.shape[1]} positions"
            )
        h = self.project(x) + self.position[:, :length]
        return self.out(self.encoder(h).mean(dim=1))


ENCODERS.register("mlp")(MLPEncoder)
ENCODERS.register("resnet18")(ResNet18Encoder)
ENCODERS.register("sequence_transformer")(SequenceTransformerEncoder)


def build_encoder(name: str, input_shape: Sequence[int], params: dict[str, object]) -> nn.Module:
    """Build a registered encoder, turning bad keyword arguments into one-line errors."""
    factory = ENCODERS.get(name)
    try:
        return factory(input_shape, **params)
    except TypeError as err:
        raise ConfigError(f"encoder {name!r}: {err}") from None
    except (ValueError, ZeroDivisionError, OverflowError, RuntimeError, IndexError) as err:
        # an option out of the range the encoder can be built with (a negative size)
        raise ConfigError(
            f"encoder {name!r} cannot be built with the options {shown(dict(params), 80)} "
            f"({type(err).__name__}: {(str(err).splitlines() or [''])[0][:80]})"
        ) from None
