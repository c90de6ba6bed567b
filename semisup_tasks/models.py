"""Classifiers by name: small CNNs sized for CPU and torchvision classifiers adapted to the data.

Checkpoints hold a state dict plus the few facts needed to rebuild the model, and are always
loaded with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import io

import torch
from torch import nn

from .config import ARCHITECTURES, ConfigError

CNN_WIDTHS = {"cnn_small": 16, "cnn_medium": 32, "cnn_large": 64}


class SmallCNN(nn.Module):
    """A VGG-style CNN for small images: one conv at full resolution (cheap on CPU), two conv
    blocks at 1/2 and 1/4, global average pooling, dropout, linear head."""

    def __init__(self, in_channels: int, num_classes: int, width: int, dropout: float = 0.2):
        super().__init__()

        def conv(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]

        self.features = nn.Sequential(
            *conv(in_channels, width), nn.MaxPool2d(2),
            *conv(width, 2 * width), *conv(2 * width, 2 * width), nn.MaxPool2d(2),
            *conv(2 * width, 4 * width), *conv(4 * width, 4 * width),
        )
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout),
                                  nn.Linear(4 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _torchvision(arch: str, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    import torchvision

    model = torchvision.models.get_model(arch, weights=None, num_classes=num_classes)
    if arch.startswith("resnet"):
        small = min(image_size) < 96
        # small images: a 3x3 stride-1 stem without max-pool keeps enough spatial resolution
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, kernel_size=3 if small else 7,
                                stride=1 if small else 2, padding=1 if small else 3, bias=False)
        if small:
            model.maxpool = nn.Identity()
    elif arch.startswith("mobilenet"):
        first = model.features[0][0]
        model.features[0][0] = nn.Conv2d(in_channels, first.out_channels, 3,
                                         stride=1 if min(image_size) < 96 else 2, padding=1, bias=False)
    return model


def build_model(arch: str, in_channels: int, num_classes: int, image_size: tuple[int, int]) -> nn.Module:
    if arch in CNN_WIDTHS:
        return SmallCNN(in_channels, num_classes, CNN_WIDTHS[arch])
    if arch in ARCHITECTURES:
        return _torchvision(arch, in_channels, num_classes, image_size)
    raise ConfigError(f"Unknown architecture {arch!r}; choose one of {', '.join(ARCHITECTURES)}.")


def checkpoint_bytes(model: nn.Module, arch: str, in_channels: int, num_classes: int,
                     image_size: tuple[int, int], extra: dict | None = None) -> bytes:
    buf = io.BytesIO()
    torch.save({"arch": arch, "in_channels": in_channels, "num_classes": num_classes,
                "image_size": list(image_size), "state_dict": model.state_dict(), "extra": extra or {}}, buf)
    return buf.getvalue()


def weights_digest(model: nn.Module) -> str:
    """sha256 of the weights alone (names, shapes, values): equal weights give equal digests,
    whatever run or file they came from."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes() if t.dtype != torch.bfloat16 else t.float().numpy().tobytes())
    return h.hexdigest()


def load_checkpoint(data: bytes) -> tuple[nn.Module, dict]:
    """Rebuild a model from checkpoint bytes; pickled code is refused (weights_only)."""
    import pickle

    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise ConfigError("A checkpoint holds more than weights (pickled code or objects) and was refused; "
                          "retrain the model instead of loading this file.") from None
    model = build_model(ckpt["arch"], ckpt["in_channels"], ckpt["num_classes"], tuple(ckpt["image_size"]))
    model.load_state_dict(ckpt["state_dict"])
    return model, ckpt
