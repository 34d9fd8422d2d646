"""The wide ResNet-38 ("ResNet38d") of PSA, SEAM, EPS and PPC, and its ImageNet weights.

Architecture (Wu, Shen, van den Hengel, "Wider or Deeper", 2019, model A1; the layout PSA/SEAM/EPS/PPC
use): a pre-activation ResNet with output stride 8.

=========  ==============================================  ============  =====================
name       block (in -> mid -> out channels)                stride        dilation
=========  ==============================================  ============  =====================
conv1a     3x3 conv 3 -> 64                                 1             1
b2..b2_2   3 x ResBlock 64 -> 128 -> 128                    2 (first)     1
b3..b3_2   3 x ResBlock 128 -> 256 -> 256                   2 (first)     1
b4..b4_5   6 x ResBlock 256 -> 512 -> 512                   2 (first)     1
b5..b5_2   3 x ResBlock 512 -> 512 -> 1024                  1             2 (first conv: 1)
b6         bottleneck 1024 -> 512 -> 1024 -> 2048           1             4, Dropout2d 0.3
b7         bottleneck 2048 -> 1024 -> 2048 -> 4096          1             4, Dropout2d 0.5
bn7        BN + ReLU on 4096 channels ("conv6")
=========  ==============================================  ============  =====================

A ResBlock is BN-ReLU -> 3x3 conv -> BN-ReLU -> 3x3 conv plus a shortcut (a 1x1 conv on the BN-ReLU'd
input when the shape changes); a bottleneck block is BN-ReLU -> 1x1 -> BN-ReLU-Dropout -> 3x3 ->
BN-ReLU-Dropout -> 1x1 plus a 1x1 shortcut. BatchNorm is frozen (eval mode, affine not trained) and
conv1a, b2, b2_1, b2_2 are not trained, as in the PPC/SEAM networks.

Module names equal the research code's, so ``state_dict`` keys are those of the converted ``.pth``
files these repositories distribute (``b4_3.bn_branch2b1.running_mean``, ``b6.conv_branch2b2.weight``,
``bn7.weight``, ...). ``load_resnet38_weights`` reads that file or the original MXNet
``ilsvrc-cls_rna-a1_cls1000_ep-0001.params`` directly (``read_mxnet_params``: the MXNet NDArray-list
binary format parsed with numpy, no mxnet needed).

``width`` scales every channel count (1.0 = the real network, ~104 M parameters); smaller widths are
for tests and CPU experiments and cannot load the ImageNet weights.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fsae.errors import CheckpointError
from fsae.weights import read_weight_file
from fsae.models.batchnorm import freeze_batch_norm


def _ch(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class ResBlock(nn.Module):
    """Pre-activation basic block: BN-ReLU -> 3x3 (stride, first_dilation) -> BN-ReLU -> 3x3 (dilation)."""

    def __init__(self, in_channels: int, mid_channels: int, out_channels: int, stride: int = 1,
                 first_dilation: int | None = None, dilation: int = 1):
        super().__init__()
        first_dilation = dilation if first_dilation is None else first_dilation
        self.same_shape = in_channels == out_channels and stride == 1
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, mid_channels, 3, stride, padding=first_dilation,
                                       dilation=first_dilation, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(mid_channels)
        self.conv_branch2b1 = nn.Conv2d(mid_channels, out_channels, 3, padding=dilation, dilation=dilation,
                                        bias=False)
        if not self.same_shape:
            self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (block output, the BN-ReLU'd input)."""
        pre = F.relu(self.bn_branch2a(x))
        shortcut = x if self.same_shape else self.conv_branch1(pre)
        branch = self.conv_branch2a(pre)
        branch = self.conv_branch2b1(F.relu(self.bn_branch2b1(branch)))
        return shortcut + branch, pre


class BottleneckBlock(nn.Module):
    """Pre-activation bottleneck: BN-ReLU -> 1x1 (out/4) -> BN-ReLU-Dropout2d -> 3x3 (out/2, dilated) ->
    BN-ReLU-Dropout2d -> 1x1 (out), plus a 1x1 shortcut on the BN-ReLU'd input."""

    def __init__(self, in_channels: int, out_channels: int, dilation: int, dropout: float):
        super().__init__()
        self.bn_branch2a = nn.BatchNorm2d(in_channels)
        self.conv_branch2a = nn.Conv2d(in_channels, out_channels // 4, 1, bias=False)
        self.bn_branch2b1 = nn.BatchNorm2d(out_channels // 4)
        self.dropout_2b1 = nn.Dropout2d(dropout)
        self.conv_branch2b1 = nn.Conv2d(out_channels // 4, out_channels // 2, 3, padding=dilation,
                                        dilation=dilation, bias=False)
        self.bn_branch2b2 = nn.BatchNorm2d(out_channels // 2)
        self.dropout_2b2 = nn.Dropout2d(dropout)
        self.conv_branch2b2 = nn.Conv2d(out_channels // 2, out_channels, 1, bias=False)
        self.conv_branch1 = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pre = F.relu(self.bn_branch2a(x))
        branch = self.conv_branch2a(pre)
        branch = self.conv_branch2b1(self.dropout_2b1(F.relu(self.bn_branch2b1(branch))))
        branch = self.conv_branch2b2(self.dropout_2b2(F.relu(self.bn_branch2b2(branch))))
        return self.conv_branch1(pre) + branch, pre


class ResNet38(nn.Module):
    """``image (B, 3, H, W) -> conv6 (B, 4096 * width, H/8, W/8)``; ``forward_features`` also gives the
    intermediate maps the PCM of SEAM/PPC reads (``conv4``: BN-ReLU'd input of b5, 512 channels, and
    ``conv5``: of b6, 1024 channels, both at stride 8)."""

    output_stride = 8

    def __init__(self, width: float = 1.0, freeze_bn: bool = True, freeze_stem: bool = True):
        super().__init__()
        c = lambda n: _ch(n, width)  # noqa: E731 - channel count at this width
        self.width = width
        self.freeze_bn = freeze_bn
        self.conv1a = nn.Conv2d(3, c(64), 3, padding=1, bias=False)
        self.b2 = ResBlock(c(64), c(128), c(128), stride=2)
        self.b2_1 = ResBlock(c(128), c(128), c(128))
        self.b2_2 = ResBlock(c(128), c(128), c(128))
        self.b3 = ResBlock(c(128), c(256), c(256), stride=2)
        self.b3_1 = ResBlock(c(256), c(256), c(256))
        self.b3_2 = ResBlock(c(256), c(256), c(256))
        self.b4 = ResBlock(c(256), c(512), c(512), stride=2)
        self.b4_1 = ResBlock(c(512), c(512), c(512))
        self.b4_2 = ResBlock(c(512), c(512), c(512))
        self.b4_3 = ResBlock(c(512), c(512), c(512))
        self.b4_4 = ResBlock(c(512), c(512), c(512))
        self.b4_5 = ResBlock(c(512), c(512), c(512))
        self.b5 = ResBlock(c(512), c(512), c(1024), first_dilation=1, dilation=2)
        self.b5_1 = ResBlock(c(1024), c(512), c(1024), dilation=2)
        self.b5_2 = ResBlock(c(1024), c(512), c(1024), dilation=2)
        self.b6 = BottleneckBlock(c(1024), c(2048), dilation=4, dropout=0.3)
        self.b7 = BottleneckBlock(c(2048), c(4096), dilation=4, dropout=0.5)
        self.bn7 = nn.BatchNorm2d(c(4096))
        self.out_channels = c(4096)
        self.feature_channels = {"conv4": c(512), "conv5": c(1024), "conv6": c(4096)}
        if freeze_stem:
            for module in (self.conv1a, self.b2, self.b2_1, self.b2_2):
                for p in module.parameters():
                    p.requires_grad_(False)
        if freeze_bn:  # BatchNorm keeps its ImageNet statistics and affine parameters
            freeze_batch_norm(self)
            for m in self.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for p in m.parameters():
                        p.requires_grad_(False)

    def forward_features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.conv1a(x)
        for name in ("b2", "b2_1", "b2_2", "b3", "b3_1", "b3_2", "b4", "b4_1", "b4_2", "b4_3", "b4_4", "b4_5"):
            x, _ = getattr(self, name)(x)
        x, conv4 = self.b5(x)
        x, _ = self.b5_1(x)
        x, _ = self.b5_2(x)
        x, conv5 = self.b6(x)
        x, _ = self.b7(x)
        return {"conv4": conv4, "conv5": conv5, "conv6": F.relu(self.bn7(x))}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)["conv6"]


# ---------------------------------------------------------------------------------------------------
# MXNet NDArray-list files (``mx.nd.save``), read with numpy.
#
# Layout (mxnet src/ndarray/ndarray.cc, NDArray::Save / Load; dmlc-core serializer), little-endian:
#   uint64 0x112 (kMXAPINDArrayListMagic), uint64 reserved (0)
#   uint64 N, then N arrays, each:
#     uint32 magic:
#       0xF993fac9 (V2) or 0xF993faca (V3): int32 storage type (0 dense; sparse is refused),
#                                          shape = int32 ndim + ndim x int64
#       0xF993fac8 (V1):                   shape = int32 ndim + ndim x int64
#       anything else (legacy):            the magic IS ndim, then ndim x uint32
#     if ndim == 0: nothing more (an empty array)
#     int32 dev_type, int32 dev_id (the context), int32 type flag, then the raw data, C order
#   uint64 K (0 or N), then K names, each uint64 length + bytes (e.g. "arg:res2a_branch1_weight")

MXNET_LIST_MAGIC = 0x112
NDARRAY_V1_MAGIC = 0xF993FAC8
NDARRAY_V2_MAGIC = 0xF993FAC9
NDARRAY_V3_MAGIC = 0xF993FACA
# mshadow type flags
MXNET_DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32, 5: np.int8, 6: np.int64}


class _Reader:
    def __init__(self, data: bytes, path: Path):
        self.data, self.pos, self.path = data, 0, path

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise CheckpointError(f"{self.path}: truncated MXNet file (wanted {n} bytes at offset {self.pos}, "
                                  f"file has {len(self.data)})")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))


def _read_ndarray(r: _Reader, index: int) -> np.ndarray:
    (magic,) = r.unpack("I")
    if magic in (NDARRAY_V2_MAGIC, NDARRAY_V3_MAGIC, NDARRAY_V1_MAGIC):
        if magic != NDARRAY_V1_MAGIC:
            (stype,) = r.unpack("i")
            if stype != 0:
                raise CheckpointError(f"{r.path}: array {index} has sparse storage type {stype}; only dense "
                                      "arrays are supported")
        (ndim,) = r.unpack("i")
        shape = r.unpack(f"{ndim}q") if ndim > 0 else ()
    else:  # legacy: the magic is the number of dimensions, dims are uint32
        ndim = magic
        if ndim > 32:
            raise CheckpointError(f"{r.path}: array {index}: not an MXNet NDArray (header {magic:#x})")
        shape = r.unpack(f"{ndim}I") if ndim > 0 else ()
    if ndim <= 0:
        return np.zeros((0,), dtype=np.float32)
    _dev_type, _dev_id, type_flag = r.unpack("iii")
    if type_flag not in MXNET_DTYPES:
        raise CheckpointError(f"{r.path}: array {index} has unknown MXNet type flag {type_flag}")
    dtype = np.dtype(MXNET_DTYPES[type_flag]).newbyteorder("<")
    count = int(np.prod(shape))
    return np.frombuffer(r.take(count * dtype.itemsize), dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))


def read_mxnet_params(path: str | Path) -> dict[str, np.ndarray]:
    """Parse an MXNet NDArray-list file (``.params``) into ``{name: array}`` (names as stored)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: MXNet weight file not found")
    r = _Reader(path.read_bytes(), path)
    header, _reserved = r.unpack("QQ")
    if header != MXNET_LIST_MAGIC:
        raise CheckpointError(f"{path}: not an MXNet NDArray file (header {header:#x}, expected {MXNET_LIST_MAGIC:#x})")
    (count,) = r.unpack("Q")
    arrays = [_read_ndarray(r, i) for i in range(count)]
    (n_names,) = r.unpack("Q")
    if n_names != count:
        raise CheckpointError(f"{path}: {count} arrays but {n_names} names; a weight file needs one name per array")
    names = []
    for _ in range(n_names):
        (length,) = r.unpack("Q")
        names.append(r.take(length).decode("utf-8"))
    return dict(zip(names, arrays))


_BN_PARAMS = {"gamma": "weight", "beta": "bias", "moving_mean": "running_mean", "moving_var": "running_var",
              "mean": "running_mean", "var": "running_var"}
_BLOCK_NAME = re.compile(r"^(res|bn)(\d)([a-z])(\d*)_(branch[0-9a-z]+)_(.+)$")


def mxnet_to_torch_name(name: str) -> str | None:
    """``arg:res4b3_branch2b1_weight`` -> ``b4_3.conv_branch2b1.weight``; None for the ImageNet classifier.

    Raises CheckpointError for a name outside the ResNet-38 layout.
    """
    key = name.split(":", 1)[1] if ":" in name else name
    if key.startswith(("linear1000", "fc")):
        return None
    if key == "conv1a_weight":
        return "conv1a.weight"
    if key.startswith("bn7_") and key[4:] in _BN_PARAMS:
        return f"bn7.{_BN_PARAMS[key[4:]]}"
    m = _BLOCK_NAME.match(key)
    if m is None:
        raise CheckpointError(f"unrecognised MXNet ResNet-38 parameter name {name!r}")
    kind, stage, letter, index, branch, param = m.groups()
    block = f"b{stage}" if letter == "a" and not index else f"b{stage}_{index}"
    if kind == "res":
        if param != "weight":
            raise CheckpointError(f"unrecognised MXNet ResNet-38 parameter name {name!r}")
        return f"{block}.conv_{branch}.weight"
    if param not in _BN_PARAMS:
        raise CheckpointError(f"unrecognised MXNet ResNet-38 parameter name {name!r}")
    return f"{block}.bn_{branch}.{_BN_PARAMS[param]}"


def resnet38_state_from_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors in the ``.pth`` key layout from a ``.params`` (MXNet) or ``.pth`` (torch) file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: ResNet-38 weight file not found")
    if path.suffix == ".params":
        state = {}
        for name, array in read_mxnet_params(path).items():
            try:
                key = mxnet_to_torch_name(name)
            except CheckpointError as exc:
                raise CheckpointError(f"{path}: {exc}") from exc
            if key is not None:
                state[key] = torch.from_numpy(np.ascontiguousarray(array))
        return state
    state = read_weight_file(path, "ResNet-38 weight")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a state dict of ResNet-38 weights")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_resnet38_weights(model: ResNet38, path: str | Path) -> None:
    """Load ImageNet weights into ``model``; every backbone tensor must be present with its shape.

    Extra entries (the ImageNet classifier, or a CAM head saved with the backbone) are ignored.
    """
    state = resnet38_state_from_file(path)
    target = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in target if k not in state]
    if missing:
        raise CheckpointError(f"{path}: missing ResNet-38 weight {missing[0]!r} ({len(missing)} missing in all: "
                              f"{missing[:5]})")
    wrong = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in target.items() if state[k].shape != v.shape]
    if wrong:
        k, got, want = wrong[0]
        raise CheckpointError(f"{path}: ResNet-38 weight {k!r} has shape {got}, the network needs {want} "
                              f"({len(wrong)} mismatched in all; width={model.width} needs width 1.0 weights)")
    model.load_state_dict({k: state[k].to(v.dtype) for k, v in target.items()}, strict=False)
