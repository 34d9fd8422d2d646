"""The wide ResNet-38: architecture, the distributed .pth key layout, and the MXNet .params reader."""

import struct

import numpy as np
import pytest
import torch
from torch import nn

from fsae.errors import CheckpointError
from fsae.models.backbones import build_backbone
from fsae.models.resnet38 import ResNet38, load_resnet38_weights, mxnet_to_torch_name, read_mxnet_params

# (block, in, mid, out, stride, first dilation, dilation) of the published ResNet-38 (PSA/SEAM/EPS/PPC).
BASIC_BLOCKS = [
    ("b2", 64, 128, 128, 2, 1, 1), ("b2_1", 128, 128, 128, 1, 1, 1), ("b2_2", 128, 128, 128, 1, 1, 1),
    ("b3", 128, 256, 256, 2, 1, 1), ("b3_1", 256, 256, 256, 1, 1, 1), ("b3_2", 256, 256, 256, 1, 1, 1),
    ("b4", 256, 512, 512, 2, 1, 1), *[(f"b4_{i}", 512, 512, 512, 1, 1, 1) for i in range(1, 6)],
    ("b5", 512, 512, 1024, 1, 1, 2), ("b5_1", 1024, 512, 1024, 1, 2, 2), ("b5_2", 1024, 512, 1024, 1, 2, 2),
]
# (block, in, out, dilation, dropout) of the two bottleneck blocks.
BOTTLENECKS = [("b6", 1024, 2048, 4, 0.3), ("b7", 2048, 4096, 4, 0.5)]


def published_shapes() -> dict[str, tuple]:
    """Every tensor of the distributed ResNet-38 .pth, written out from the architecture table."""
    shapes = {"conv1a.weight": (64, 3, 3, 3)}

    def bn(prefix, c):
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.{p}"] = (c,)

    for name, cin, mid, cout, stride, _, _ in BASIC_BLOCKS:
        bn(f"{name}.bn_branch2a", cin)
        shapes[f"{name}.conv_branch2a.weight"] = (mid, cin, 3, 3)
        bn(f"{name}.bn_branch2b1", mid)
        shapes[f"{name}.conv_branch2b1.weight"] = (cout, mid, 3, 3)
        if cin != cout or stride != 1:
            shapes[f"{name}.conv_branch1.weight"] = (cout, cin, 1, 1)
    for name, cin, cout, _, _ in BOTTLENECKS:
        bn(f"{name}.bn_branch2a", cin)
        shapes[f"{name}.conv_branch2a.weight"] = (cout // 4, cin, 1, 1)
        bn(f"{name}.bn_branch2b1", cout // 4)
        shapes[f"{name}.conv_branch2b1.weight"] = (cout // 2, cout // 4, 3, 3)
        bn(f"{name}.bn_branch2b2", cout // 2)
        shapes[f"{name}.conv_branch2b2.weight"] = (cout, cout // 2, 1, 1)
        shapes[f"{name}.conv_branch1.weight"] = (cout, cin, 1, 1)
    bn("bn7", 4096)
    return shapes


def test_full_width_network_has_the_published_layout():
    with torch.device("meta"):
        net = ResNet38()
    state = {k: tuple(v.shape) for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert state == published_shapes()
    assert sum(int(np.prod(s)) for s in state.values()) > 100e6  # the ~104 M parameter network
    for name, _, _, _, stride, first, dil in BASIC_BLOCKS:
        block = getattr(net, name)
        assert block.conv_branch2a.stride == (stride, stride)
        assert block.conv_branch2a.dilation == (first, first) and block.conv_branch2b1.dilation == (dil, dil)
    for name, _, _, dil, p in BOTTLENECKS:
        block = getattr(net, name)
        assert block.conv_branch2b1.dilation == (dil, dil)
        assert block.dropout_2b1.p == p and block.dropout_2b2.p == p
        assert isinstance(block.dropout_2b1, nn.Dropout2d)
    assert net.out_channels == 4096


def test_output_stride_frozen_bn_and_stem():
    torch.manual_seed(0)
    net = ResNet38(width=0.0625)
    net.train()
    assert all(not m.training for m in net.modules() if isinstance(m, nn.BatchNorm2d))
    assert net.b6.dropout_2b1.training  # dropout still trains
    frozen = {n for n, p in net.named_parameters() if not p.requires_grad}
    assert "conv1a.weight" in frozen and "b2_2.conv_branch2b1.weight" in frozen and "b4.bn_branch2a.weight" in frozen
    assert "b3.conv_branch2a.weight" not in frozen and "b7.conv_branch2b2.weight" not in frozen
    feats = net.eval().forward_features(torch.randn(1, 3, 64, 48))
    assert feats["conv6"].shape == (1, 256, 8, 6)
    assert feats["conv4"].shape == (1, 32, 8, 6) and feats["conv5"].shape == (1, 64, 8, 6)
    assert (feats["conv6"] >= 0).all()
    trainable = ResNet38(width=0.0625, freeze_bn=False, freeze_stem=False).train()
    assert all(m.training for m in trainable.modules() if isinstance(m, nn.BatchNorm2d))
    assert all(p.requires_grad for p in trainable.parameters())
    assert build_backbone("resnet38", 8, None, resnet38={"width": 0.0625}).out_channels == 256


def random_state(width: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        net = ResNet38(width=width)
    keys = {k: v.shape for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    return {k: torch.randn(shape, generator=gen) for k, shape in keys.items()}


def test_pth_file_in_the_distributed_layout_loads(tmp_path):
    state = random_state(0.0625)
    state["fc8.weight"] = torch.randn(21, 256, 1, 1)  # a CAM head saved with the backbone: ignored
    path = tmp_path / "res38d.pth"
    torch.save(state, path)
    net = build_backbone("resnet38", 8, str(path), resnet38={"width": 0.0625})
    loaded = net.state_dict()
    for key, value in state.items():
        if key != "fc8.weight":
            torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    # The DataParallel "module." prefix of saved research checkpoints is accepted too.
    torch.save({"module." + k: v for k, v in state.items()}, tmp_path / "dp.pth")
    load_resnet38_weights(ResNet38(width=0.0625), tmp_path / "dp.pth")


def test_missing_or_mismatched_key_is_named(tmp_path):
    state = random_state(0.0625)
    del state["b4_3.bn_branch2b1.running_mean"]
    torch.save(state, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing.pth.*b4_3\.bn_branch2b1\.running_mean"):
        load_resnet38_weights(ResNet38(width=0.0625), tmp_path / "missing.pth")
    torch.save(random_state(0.125), tmp_path / "wider.pth")
    with pytest.raises(CheckpointError, match=r"conv1a\.weight.*shape \(8, 3, 3, 3\).*\(4, 3, 3, 3\)"):
        load_resnet38_weights(ResNet38(width=0.0625), tmp_path / "wider.pth")


# --- MXNet NDArray-list files, written here byte by byte from the documented layout ------------------

def mxnet_name(torch_key: str) -> str:
    """The MXNet name of a .pth key, written plainly: b4_3.bn_branch2b1.running_mean -> aux:bn4b3_branch2b1_moving_mean."""
    if torch_key == "conv1a.weight":
        return "arg:conv1a_weight"
    bn_names = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}
    parts = torch_key.split(".")
    if parts[0] == "bn7":
        prefix = "aux" if parts[1].startswith("running") else "arg"
        return f"{prefix}:bn7_{bn_names[parts[1]]}"
    block, layer, param = parts
    stage = block[1]
    unit = "a" if "_" not in block else "b" + block.split("_")[1]
    kind, branch = layer.split("_", 1)
    if kind == "conv":
        return f"arg:res{stage}{unit}_{branch}_weight"
    prefix = "aux" if param.startswith("running") else "arg"
    return f"{prefix}:bn{stage}{unit}_{branch}_{bn_names[param]}"


def legacy_ndarray(a: np.ndarray) -> bytes:
    """Pre-2017 layout: uint32 ndim, uint32 dims, context (int32 dev_type 1 = cpu, int32 id), int32 type 0, data."""
    a = np.ascontiguousarray(a, dtype="<f4")
    return (struct.pack("<I", a.ndim) + struct.pack(f"<{a.ndim}I", *a.shape) + struct.pack("<iii", 1, 0, 0)
            + a.tobytes())


def v2_ndarray(a: np.ndarray) -> bytes:
    """V2 layout: uint32 0xF993fac9, int32 storage type 0, int32 ndim, int64 dims, context, type flag, data."""
    flags = {np.dtype("float32"): 0, np.dtype("float64"): 1, np.dtype("float16"): 2}
    a = np.ascontiguousarray(a)
    return (struct.pack("<Iii", 0xF993FAC9, 0, a.ndim) + struct.pack(f"<{a.ndim}q", *a.shape)
            + struct.pack("<iii", 2, 0, flags[a.dtype]) + a.astype(a.dtype.newbyteorder("<")).tobytes())


def mxnet_file(arrays: dict[str, np.ndarray], encode) -> bytes:
    out = struct.pack("<QQ", 0x112, 0) + struct.pack("<Q", len(arrays))
    out += b"".join(encode(a) for a in arrays.values())
    out += struct.pack("<Q", len(arrays))
    for name in arrays:
        raw = name.encode()
        out += struct.pack("<Q", len(raw)) + raw
    return out


@pytest.mark.parametrize("encode", [legacy_ndarray, v2_ndarray])
def test_mxnet_params_file_parses_to_the_same_arrays(tmp_path, encode):
    rng = np.random.default_rng(0)
    arrays = {"arg:a": rng.normal(size=(2, 3, 1, 1)).astype(np.float32), "aux:b": rng.normal(size=(5,)).astype(np.float32)}
    if encode is v2_ndarray:
        arrays["arg:c"] = rng.normal(size=(3, 2)).astype(np.float64)
    path = tmp_path / "x.params"
    path.write_bytes(mxnet_file(arrays, encode))
    parsed = read_mxnet_params(path)
    assert list(parsed) == list(arrays)
    for name, a in arrays.items():
        assert parsed[name].dtype == a.dtype and parsed[name].shape == a.shape
        np.testing.assert_array_equal(parsed[name], a)


def test_mxnet_resnet38_file_loads_into_the_network(tmp_path):
    state = random_state(0.0625, seed=1)
    arrays = {mxnet_name(k): v.numpy() for k, v in state.items()}
    arrays["arg:linear1000_weight"] = np.zeros((1000, 256), np.float32)  # the ImageNet classifier: skipped
    path = tmp_path / "ilsvrc-cls_rna-a1_cls1000_ep-0001.params"
    path.write_bytes(mxnet_file(arrays, legacy_ndarray))
    assert mxnet_to_torch_name("aux:bn4b3_branch2b1_moving_mean") == "b4_3.bn_branch2b1.running_mean"
    assert mxnet_to_torch_name("arg:res6a_branch2b2_weight") == "b6.conv_branch2b2.weight"
    net = build_backbone("resnet38", 8, str(path), resnet38={"width": 0.0625})
    loaded = net.state_dict()
    for key, value in state.items():
        torch.testing.assert_close(loaded[key], value, rtol=0, atol=0)
    del arrays["aux:bn5b2_branch2a_moving_var"]
    path.write_bytes(mxnet_file(arrays, legacy_ndarray))
    with pytest.raises(CheckpointError, match=r"b5_2\.bn_branch2a\.running_var"):
        load_resnet38_weights(ResNet38(width=0.0625), path)


def test_broken_mxnet_files_name_the_file(tmp_path):
    bad = tmp_path / "bad.params"
    bad.write_bytes(struct.pack("<QQ", 0x999, 0))
    with pytest.raises(CheckpointError, match="bad.params.*not an MXNet"):
        read_mxnet_params(bad)
    short = tmp_path / "short.params"
    short.write_bytes(mxnet_file({"arg:a": np.ones(4, np.float32)}, legacy_ndarray)[:-12])
    with pytest.raises(CheckpointError, match="short.params.*truncated"):
        read_mxnet_params(short)
