"""Pretrained files: the upstream key layouts load strictly into the recipes' networks, and the resolver."""

import hashlib
from pathlib import Path

import pytest
import torch

from fsae import weights as W
from fsae.cli import main as cli
from fsae.config import load_config
from fsae.errors import CheckpointError

REPO = Path(__file__).resolve().parents[1]


def random_like(state: dict) -> dict:
    """Same keys and shapes, random values (BatchNorm variances kept positive)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, v in state.items():
        if v.is_floating_point():
            out[k] = torch.rand(v.shape, generator=g) + 0.5 if k.endswith("running_var") else \
                torch.randn(v.shape, generator=g)
        else:
            out[k] = v.clone()
    return out


@pytest.fixture(scope="module")
def torchvision_resnet50(tmp_path_factory):
    """A file with exactly torchvision's ResNet-50 keys (fc included) and random values."""
    import torchvision

    state = random_like(torchvision.models.resnet50().state_dict())
    path = tmp_path_factory.mktemp("w") / "random_resnet50.pth"
    torch.save(state, path)
    return path, state


def test_torchvision_resnet50_file_loads_into_the_sipe_cam_and_irn_backbones(torchvision_resnet50):
    from fsae.methods import build_method
    from fsae.refine.irn.network import BoundaryNet

    path, state = torchvision_resnet50
    for recipe in ("voc/sipe.yaml", "voc/cam.yaml"):
        cfg = load_config(REPO / "configs" / recipe, [f"model.weights={path}"])
        model = build_method(cfg.model, cfg.data.num_classes)
        net = model.features if cfg.model.method == "sipe" else model.backbone
        assert torch.equal(net.layer3[5].conv2.weight, state["layer3.5.conv2.weight"]), recipe
        assert torch.equal(net.bn1.running_var, state["bn1.running_var"]), recipe
        assert torch.equal(net.layer4[0].downsample[1].bias, state["layer4.0.downsample.1.bias"]), recipe
    irn = BoundaryNet("resnet50", str(path))
    assert torch.equal(irn.stages[4][2].conv3.weight, state["layer4.2.conv3.weight"])
    assert torch.equal(irn.stages[0][0].weight, state["conv1.weight"])


def test_a_file_missing_a_tensor_is_refused_with_its_name(torchvision_resnet50, tmp_path):
    from fsae.models.backbones import build_backbone

    _, state = torchvision_resnet50
    partial = tmp_path / "partial.pth"
    torch.save({k: v for k, v in state.items() if k != "layer2.1.bn2.weight"}, partial)
    with pytest.raises(CheckpointError, match=r"partial\.pth: does not fit .*layer2\.1\.bn2\.weight"):
        build_backbone("resnet50_irn", 16, str(partial))


def test_deit_small_file_loads_into_mctformer(tmp_path):
    import timm

    from fsae.methods import build_method

    state = random_like(timm.create_model("deit_small_patch16_224").state_dict())
    path = tmp_path / "deit.pth"
    torch.save({"model": state}, path)  # the DeiT release's layout: the state dict under "model"
    cfg = load_config(REPO / "configs/voc/mctformer.yaml", [f"model.weights={path}"])
    model = build_method(cfg.model, cfg.data.num_classes)
    assert torch.equal(model.vit.blocks[7].attn.qkv.weight, state["blocks.7.attn.qkv.weight"])
    assert torch.equal(model.vit.patch_embed.proj.weight, state["patch_embed.proj.weight"])
    assert torch.equal(model.vit.pos_embed, state["pos_embed"][:, 1:])  # 14 x 14 grid: no resampling
    assert torch.equal(model.class_tokens[0, 19], state["cls_token"][0, 0])  # MCTformer main.py:253-256


def deeplab_pytorch_coco_shapes() -> dict[str, tuple]:
    """Keys and shapes of deeplabv1_resnet101-coco.pth, written from deeplab-pytorch's model definition:
    DeepLabV1(n_classes=91, n_blocks=[3, 4, 23, 3]) (convert.py:176-183, libs/models/deeplabv1.py:23-32,
    libs/models/resnet.py: _ConvBnReLU = conv + bn, _Bottleneck = reduce / conv3x3 / increase (+ shortcut
    in block1), _Stem = conv1). convert.py copies conv weights and BN weight/bias/mean/var only."""
    shapes = {}

    def conv_bn(prefix, cin, cout, k):
        shapes[f"{prefix}.conv.weight"] = (cout, cin, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"{prefix}.bn.{p}"] = (cout,)

    conv_bn("layer1.conv1", 3, 64, 7)
    cin = 64
    for stage, (blocks, cout) in enumerate(zip([3, 4, 23, 3], [256, 512, 1024, 2048]), start=2):
        mid = cout // 4
        for b in range(1, blocks + 1):
            prefix = f"layer{stage}.block{b}"
            conv_bn(f"{prefix}.reduce", cin if b == 1 else cout, mid, 1)
            conv_bn(f"{prefix}.conv3x3", mid, mid, 3)
            conv_bn(f"{prefix}.increase", mid, cout, 1)
            if b == 1:
                conv_bn(f"{prefix}.shortcut", cin, cout, 1)
        cin = cout
    shapes["fc.weight"], shapes["fc.bias"] = (91, 2048, 1, 1), (91,)
    return shapes


def test_deeplab_pytorch_coco_init_loads_into_deeplab_v2_through_the_key_map(tmp_path):
    from fsae.segment.config import load_seg_config
    from fsae.segment.deeplab import build_deeplab

    g = torch.Generator().manual_seed(1)
    state = {k: torch.rand(s, generator=g) + 0.5 for k, s in deeplab_pytorch_coco_shapes().items()}
    path = tmp_path / "deeplabv1_resnet101-coco.pth"
    torch.save(state, path)
    cfg = load_seg_config(REPO / "configs/voc/deeplabv2_r101.yaml", [f"model.weights={path}"])
    model = build_deeplab(cfg.model, cfg.data.num_classes)
    bb = model.backbone.eval()
    assert torch.equal(bb.bn1.weight, state["layer1.conv1.bn.weight"])
    assert torch.equal(bb.bn1.running_var, state["layer1.conv1.bn.running_var"])
    assert torch.equal(bb.layer3[21].conv2.weight, state["layer4.block22.conv3x3.conv.weight"])
    assert torch.equal(bb.layer2[0].downsample[1].running_var, state["layer3.block1.shortcut.bn.running_var"])
    assert torch.equal(bb.layer4[2].bn3.bias, state["layer5.block3.increase.bn.bias"])

    # The stem reads fsae's normalised RGB as deeplab-pytorch's stem reads Caffe's input: a plain
    # reference of deeplab-pytorch (libs/datasets/base.py: BGR, 0..255, minus configs/voc12.yaml:21-24's
    # mean; resnet.py:41-45 conv 7x7 stride 2 pad 3, BatchNorm eps 1e-5, ReLU), on a random image.
    from fsae.augment import IMAGENET_MEAN, IMAGENET_STD

    rgb = torch.rand(1, 3, 40, 48, generator=g)
    caffe = rgb.flip(1) * 255 - torch.tensor([104.008, 116.669, 122.675]).view(1, 3, 1, 1)
    ref = torch.nn.functional.conv2d(caffe, state["layer1.conv1.conv.weight"], stride=2, padding=3)
    ref = torch.nn.functional.batch_norm(ref, state["layer1.conv1.bn.running_mean"],
                                         state["layer1.conv1.bn.running_var"], state["layer1.conv1.bn.weight"],
                                         state["layer1.conv1.bn.bias"], training=False, eps=1e-5)
    x = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        got = bb.bn1(bb.conv1(x))
    interior = (slice(None), slice(None), slice(2, -2), slice(2, -2))  # outputs whose 7x7 window has no padding
    scale = ref[interior].abs().max()
    assert (got[interior] - ref[interior]).abs().max() <= 1e-4 * scale
    assert (got - ref).abs().max() <= 0.05 * scale  # at the border the two paddings differ by < 1 grey level


def test_imagenet_resolves_to_the_verified_file_in_the_weights_folder(tmp_path, monkeypatch):
    good = tmp_path / "resnet50-19c8e357.pth"
    good.write_bytes(b"pretend weights")
    digest = hashlib.sha256(b"pretend weights").hexdigest()
    wf = W.WeightFile(good.name, digest[:8], "https://example.invalid/r50.pth", "test file")
    monkeypatch.setitem(W.DEFAULTS, "resnet50_irn", (wf,))
    monkeypatch.setenv("FSAE_WEIGHTS", str(tmp_path))
    assert W.resolve_weights("imagenet", "resnet50_irn", download=False) == str(good)
    assert W.resolve_weights(None, "resnet50_irn") is None
    good.write_bytes(b"another file")
    with pytest.raises(W.WeightsError, match=r"resnet50-19c8e357\.pth: sha256 .* does not match"):
        W.resolve_weights("imagenet", "resnet50_irn", download=False)


def test_offline_and_missing_names_file_checksum_url_and_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FSAE_WEIGHTS", str(tmp_path / "weights"))
    monkeypatch.setenv("FSAE_OFFLINE", "1")
    with pytest.raises(W.WeightsError) as err:
        W.resolve_weights("imagenet", "resnet50_irn")
    text = str(err.value)
    for part in ("resnet50-19c8e357.pth", "sha256 19c8e357", str(tmp_path / "weights"), "resnet50-0676ba61.pth",
                 "https://download.pytorch.org/models/resnet50-19c8e357.pth"):
        assert part in text
    with pytest.raises(W.WeightsError, match=r"deit_small_patch16_224-cd65a155\.pth .*sha256 cd65a155"):
        W.resolve_weights("imagenet", "deit_small_patch16_224")
    with pytest.raises(W.WeightsError, match="no documented default for backbone 'tinycnn'"):
        W.resolve_weights("imagenet", "tinycnn")


def test_building_a_voc_recipe_offline_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FSAE_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("FSAE_OFFLINE", "1")
    from fsae.methods import build_method

    cfg = load_config(REPO / "configs/voc/cam.yaml")  # loading needs no file
    with pytest.raises(W.WeightsError, match=r"resnet50-19c8e357\.pth not found in"):
        build_method(cfg.model, cfg.data.num_classes)


def test_cli_weights_check_reports_present_intact_and_corrupt(tmp_path, monkeypatch, capsys):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "a.yaml").write_text("model:\n  backbone: resnet50_irn\n  weights: imagenet\n")
    (configs / "b.yaml").write_text("model:\n  backbone: tinycnn\n")
    folder = tmp_path / "w"
    folder.mkdir()
    (folder / "f.pth").write_bytes(b"abc")
    wf = W.WeightFile("f.pth", hashlib.sha256(b"abc").hexdigest()[:8], "https://example.invalid/f.pth", "t")
    monkeypatch.setitem(W.DEFAULTS, "resnet50_irn", (wf,))
    monkeypatch.setenv("FSAE_WEIGHTS", str(folder))
    assert cli(["weights", "check", "--configs", str(configs)]) == 0
    out = capsys.readouterr().out
    assert f"{folder / 'f.pth'}: intact" in out and "b.yaml  model.weights: None  (trained from scratch)" in out
    (folder / "f.pth").write_bytes(b"abd")
    assert cli(["weights", "check", "--configs", str(configs)]) == 1
    assert "CORRUPT" in capsys.readouterr().out
    (folder / "f.pth").unlink()
    assert cli(["weights", "list", "--configs", str(configs)]) == 0
    assert "missing  <- https://example.invalid/f.pth" in capsys.readouterr().out


def test_every_shipped_recipe_weights_entry_is_known():
    entries = {e.recipe.relative_to(REPO).as_posix(): e for e in W.recipe_weights(REPO / "configs")}
    for name, e in entries.items():
        if name.startswith("configs/synthetic/"):
            assert e.value is None, name  # synthetic recipes train from scratch
        else:
            assert e.files and e.files[0].what != "a local file", name
