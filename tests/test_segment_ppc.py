"""The segmentation recipes of other codebases: the PPC/EPS authors' DeepLab V2 / V1 (YudeWang's codebase) and
MCTformer's ResNet-38 DeepLab. Recipe values against the authors' configs, the new heads against plainly
written references, the ResNet-38 / resnet101s backbones' strides, the optimiser groups, the test-time
fusions, and a short training + inference run of each recipe on the generated set."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fsae.cli import main
from fsae.io import read_id_list, read_json
from fsae.segment.config import SegConfig
from fsae.segment.deeplab import ASPPConcat, DilatedPairHead, LargeFOV, build_deeplab, load_pretrained
from fsae.segment.infer import multiscale_probs
from fsae.segment.train import build_seg_optimizer

ROOT = Path(__file__).resolve().parents[1]
C = 4

# ------------------------------------------------------------------------------------------ recipes

# usr922/wseg master segmentation/experiment/EPS_deeplabv2_resnet101/config.py, line by line.
PPC_V2 = {
    "DATA_AUG": True,  # :17
    "DATA_WORKERS": 4,  # :18
    "DATA_RANDOMCROP": 448,  # :21
    "DATA_RANDOMSCALE": [0.5, 1.5],  # :22
    "DATA_RANDOMFLIP": 0.5,  # :26
    "MODEL_NAME": "deeplabv2",  # :29
    "MODEL_NUM_CLASSES": 21,  # :32
    "MODEL_FREEZEBN": False,  # :33
    "MODEL_OUTPUT_STRIDE": 8,  # :42
    "MODEL_ASPP_OUTDIM": 256,  # :43
    "TRAIN_LR": 0.001,  # :46
    "TRAIN_MOMENTUM": 0.9,  # :47
    "TRAIN_WEIGHT_DECAY": 0.0005,  # :48
    "TRAIN_BN_MOM": 0.0003,  # :49
    "TRAIN_POWER": 0.9,  # :50
    "TRAIN_BATCHES": 10,  # :51
    "TRAIN_ITERATION": 20000,  # :54
    "TEST_MULTISCALE": [0.5, 0.75, 1.0, 1.25, 1.5, 1.75],  # :57
    "TEST_FLIP": True,  # :58
    "TEST_CRF": True,  # :59
}
# usr922/wseg master segmentation/experiment/EPS_deeplabv1_resnet101/config.py: the same values at
# :17-33 and :39-52, except the model name (:29) and no ASPP / output-stride entries.
PPC_V1 = {**{k: v for k, v in PPC_V2.items() if k not in ("MODEL_ASPP_OUTDIM", "MODEL_OUTPUT_STRIDE")},
          "MODEL_NAME": "deeplabv1"}
# Outside the configs: train.py:71-80 (weights 1x / 10x with decay, biases 2x / 20x without), :8-11 (seed 1);
# deeplabv2.py:21 (rates), ASPP.py:53 + deeplabv2.py:43 and deeplabv1.py:22 (dropout 0.5), deeplabv1.py:18-20
# (512 channels, dilation 12); test.py:84-92 (softmax of the mean logits); the FSAE authors' test CRF,
# obeychoi0120/wseg master EPS_deeplabv2_resnet101/test.py:100 dense_crf(prob, img) with DenseCRF.py:5,20,22
# defaults: n_iters 1, Gaussian sxy 3 compat 3, bilateral sxy 32 srgb 13 compat 10.
PPC_CRF = {"enabled": True, "iterations": 1, "gaussian_sxy": 3.0, "gaussian_compat": 3.0, "bilateral_sxy": 32.0,
           "bilateral_srgb": 13.0, "bilateral_compat": 10.0}


def ppc_table(cfg: dict) -> dict:
    table = {
        "data.kind": "voc", "data.root": "data/VOCdevkit/VOC2012", "data.num_classes": cfg["MODEL_NUM_CLASSES"] - 1,
        "data.train_split": "train_aug" if cfg["DATA_AUG"] else "train", "data.val_split": "val",
        "data.test_split": "test", "data.mask_dir": None, "data.gt_dir": "SegmentationClass",
        "data.crop_size": cfg["DATA_RANDOMCROP"], "data.scale_range": cfg["DATA_RANDOMSCALE"],
        "data.hflip": cfg["DATA_RANDOMFLIP"] > 0, "data.workers": cfg["DATA_WORKERS"],
        "model.arch": cfg["MODEL_NAME"], "model.head": "ppc", "model.backbone": "resnet101s",
        "model.output_stride": cfg.get("MODEL_OUTPUT_STRIDE", 8),  # resnet.py:144 dilated=True: stride 8
        "model.weights": "data/weights/resnet101s-03a0f310.pth",  # resnet.py:16
        "model.freeze_bn": cfg["MODEL_FREEZEBN"], "model.dropout": 0.5, "model.bn_momentum": cfg["TRAIN_BN_MOM"],
        "optim.lr": cfg["TRAIN_LR"], "optim.momentum": cfg["TRAIN_MOMENTUM"],
        "optim.weight_decay": cfg["TRAIN_WEIGHT_DECAY"], "optim.poly_power": cfg["TRAIN_POWER"],
        "optim.head_lr_mult": 10.0, "optim.bias_lr_mult": 2.0, "optim.bias_weight_decay": False,
        "optim.train_bn_affine": False,
        "train.iterations": cfg["TRAIN_ITERATION"], "train.batch_size": cfg["TRAIN_BATCHES"], "train.seed": 1,
        "train.device": "cuda", "train.checkpoint_every": 1000,
        "infer.scales": cfg["TEST_MULTISCALE"], "infer.flip": cfg["TEST_FLIP"], "infer.fuse": "mean_logits",
        **{f"infer.crf.{k}": v for k, v in PPC_CRF.items()},
    }
    table["infer.crf.enabled"] = cfg["TEST_CRF"]
    if cfg["MODEL_NAME"] == "deeplabv2":
        table.update({"model.aspp_rates": [6, 12, 18, 24], "model.aspp_channels": cfg["MODEL_ASPP_OUTDIM"]})
    else:
        table.update({"model.largefov_dilation": 12, "model.largefov_channels": 512})
    return table


# xulianuwa/MCTformer 9606597: run_seg.sh, seg/train_seg.py, seg/tool/{exutils,torchutils,imutils}.py.
MCT = {
    "num_classes": 21,  # run_seg.sh:9
    "batch_size": 4,  # run_seg.sh:10
    "num_epochs": 30,  # run_seg.sh:3
    "train_aug_images": 10582,  # voc12/train_aug_id.txt (run_seg.sh:7)
    "lr": 0.0007,  # train_seg.py:30
    "wt_dec": 1e-5,  # train_seg.py:31, given to SGD as its momentum (torchutils.py:36-37)
    "crop_size": 321,  # train_seg.py:35
    "scale": [0.7, 1.3],  # exutils.py:110
    "test_scales": [0.5, 0.75, 1.0, 1.25, 1.5],  # run_seg.sh:19
    "crf": {"iterations": 10, "gaussian_sxy": 4.0, "gaussian_compat": 3.0,  # imutils.py:3,18
            "bilateral_sxy": 83.0, "bilateral_srgb": 5.0, "bilateral_compat": 3.0},  # imutils.py:19
}
MCT_TABLE = {
    "data.kind": "voc", "data.root": "data/VOCdevkit/VOC2012", "data.num_classes": MCT["num_classes"] - 1,
    "data.train_split": "train_aug", "data.val_split": "val", "data.test_split": "test", "data.mask_dir": None,
    "data.gt_dir": "SegmentationClass", "data.crop_size": MCT["crop_size"], "data.scale_range": MCT["scale"],
    "data.hflip": True, "data.workers": 8,
    "model.arch": "deeplabv1", "model.head": "mctformer", "model.backbone": "resnet38", "model.output_stride": 8,
    "model.weights": "data/weights/res38_cls.pth", "model.freeze_bn": True,  # resnet38d.py:206-211
    "model.largefov_dilation": 12, "model.largefov_channels": 512, "model.resnet38_width": 1.0,  # resnet38_seg.py:12
    "optim.lr": MCT["lr"], "optim.momentum": MCT["wt_dec"], "optim.weight_decay": 0.0, "optim.poly_power": 0.9,
    "optim.head_lr_mult": 10.0, "optim.bias_lr_mult": 1.0, "optim.bias_weight_decay": True,
    "optim.train_bn_affine": False,
    "train.iterations": MCT["num_epochs"] * (MCT["train_aug_images"] // MCT["batch_size"]),  # train_seg.py:57-58
    "train.batch_size": MCT["batch_size"], "train.device": "cuda",
    "train.checkpoint_every": MCT["train_aug_images"] // MCT["batch_size"],  # train_seg.py:110, each epoch
    "infer.scales": MCT["test_scales"], "infer.flip": False, "infer.fuse": "max_probs",  # infer_seg.py:87-98
    "infer.crf.enabled": True, **{f"infer.crf.{k}": v for k, v in MCT["crf"].items()},
}
RECIPES = {
    "configs/voc/deeplabv2_r101_ppc.yaml": {**ppc_table(PPC_V2), "name": "voc_deeplabv2_r101_ppc"},
    "configs/voc/deeplabv1_r101_ppc.yaml": {**ppc_table(PPC_V1), "name": "voc_deeplabv1_r101_ppc"},
    "configs/voc/deeplab_r38_mct.yaml": {**MCT_TABLE, "name": "voc_deeplab_r38_mct"},
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_fields_match_the_authors_configs(recipe, check_seg_recipe):
    check_seg_recipe(recipe, RECIPES[recipe])


# ------------------------------------------------------------------------------------------ heads


def _bn_train(x, bn):
    """BatchNorm in training mode written out: batch statistics (biased variance), then the affine."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + bn.eps) * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1)


def _conv(x, conv, dilation=1):
    """A convolution written as a sum over kernel taps (zero padding ``dilation * (k // 2)``)."""
    w = conv.weight
    k = w.shape[-1]
    pad = dilation * (k // 2)
    xp = F.pad(x, (pad, pad, pad, pad))
    h, wd = x.shape[-2:]
    out = torch.zeros(x.shape[0], w.shape[0], h, wd, dtype=x.dtype)
    for i in range(k):
        for j in range(k):
            patch = xp[:, :, i * dilation:i * dilation + h, j * dilation:j * dilation + wd]
            out += torch.einsum("bchw,oc->bohw", patch, w[:, :, i, j])
    return out if conv.bias is None else out + conv.bias.view(1, -1, 1, 1)


def test_largefov_with_bn_equals_a_plain_reference():
    # PPC authors' deeplabv1.py:41-50: conv_fov (3x3, dil 12, no bias) - BN - ReLU - conv_fov2 (1x1, no
    # bias) - BN - ReLU - Dropout - cls_conv (1x1, bias).
    torch.manual_seed(0)
    head = LargeFOV(6, 3, dilation=2, channels=5, dropout=0.0, batch_norm=True, bn_momentum=3e-4)
    for bn in (head.bn6, head.bn7):
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(3, 6, 7, 5)
    assert head.fc6.bias is None and head.fc7.bias is None and head.fc8.bias is not None
    head.train()
    got = head(x)
    a = torch.relu(_bn_train(_conv(x, head.fc6, 2), head.bn6))
    b = torch.relu(_bn_train(_conv(a, head.fc7), head.bn7))
    want = _conv(b, head.fc8)
    assert got.shape == (3, 3, 7, 5)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Running mean after one step with momentum m: (1 - m) * 0 + m * batch mean.
    torch.testing.assert_close(head.bn6.running_mean, 3e-4 * _conv(x, head.fc6, 2).mean(dim=(0, 2, 3)))
    # Eval mode: the running statistics instead of the batch's.
    head.eval()
    rm, rv = head.bn6.running_mean, head.bn6.running_var
    bn6 = (_conv(x, head.fc6, 2) - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) + 1e-5)
    a = torch.relu(bn6 * head.bn6.weight.view(1, -1, 1, 1) + head.bn6.bias.view(1, -1, 1, 1))
    rm, rv = head.bn7.running_mean, head.bn7.running_var
    bn7 = (_conv(a, head.fc7) - rm.view(1, -1, 1, 1)) / torch.sqrt(rv.view(1, -1, 1, 1) + 1e-5)
    b = torch.relu(bn7 * head.bn7.weight.view(1, -1, 1, 1) + head.bn7.bias.view(1, -1, 1, 1))
    torch.testing.assert_close(head(x), _conv(b, head.fc8), rtol=1e-4, atol=1e-5)


def test_largefov_with_bn_drops_out_only_before_the_classifier():
    torch.manual_seed(0)
    head = LargeFOV(6, 3, dilation=1, channels=5, dropout=0.5, batch_norm=True).train()
    dropped = []
    head.drop.register_forward_hook(lambda m, i, o: dropped.append(o))
    head(torch.randn(2, 6, 4, 4))
    assert len(dropped) == 1 and isinstance(head.drop, torch.nn.Dropout)


def test_aspp_concat_equals_a_plain_reference():
    # ASPP.py:62-79 (branches at rates r, a global-pool branch broadcast, concatenated, 1x1 conv-BN-ReLU),
    # deeplabv2.py:51-56 (dropout, cls_conv); eval mode, so BN uses running statistics and dropout is off.
    torch.manual_seed(0)
    head = ASPPConcat(6, 3, rates=(1, 2), channels=4, dropout=0.5).eval()
    for m in head.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    x = torch.randn(2, 6, 5, 7)

    def cbr(t, seq, dilation=1):
        conv, bn = seq[0], seq[1]
        y = _conv(t, conv, dilation)
        y = (y - bn.running_mean.view(1, -1, 1, 1)) / torch.sqrt(bn.running_var.view(1, -1, 1, 1) + bn.eps)
        return torch.relu(y * bn.weight.view(1, -1, 1, 1) + bn.bias.view(1, -1, 1, 1))

    maps = [cbr(x, head.branches[0], 1), cbr(x, head.branches[1], 2)]
    pooled = cbr(x.mean(dim=(2, 3), keepdim=True), head.image_pool)
    maps.append(pooled.repeat(1, 1, 5, 7))
    want = _conv(cbr(torch.cat(maps, 1), head.fuse[0]), head.classifier)
    got = head(x)
    assert got.shape == (2, 3, 5, 7)
    assert head.fuse[0][0].in_channels == 4 * 3  # 2 rates + the pooling branch, 4 channels each
    assert all(s[0].bias is None for s in head.branches)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mctformer_head_equals_a_plain_reference():
    # resnet38_seg.py:21-26: relu(conv1(x)) then conv2, both 3x3 at dilation 12 (here 2) with bias.
    torch.manual_seed(0)
    head = DilatedPairHead(6, 3, dilation=2, channels=5)
    x = torch.randn(2, 6, 6, 5)
    want = _conv(torch.relu(_conv(x, head.conv1, 2)), head.conv2, 2)
    torch.testing.assert_close(head(x), want, rtol=1e-4, atol=1e-5)
    assert head(x).shape == (2, 3, 6, 5)


# ------------------------------------------------------------------------------------------ backbones


def _model_cfg(**fields):
    cfg = SegConfig().model
    cfg.weights = None
    for key, value in fields.items():
        setattr(cfg, key, value)
    return cfg


def test_resnet38_deeplab_output_stride_and_shapes():
    cfg = _model_cfg(arch="deeplabv1", head="mctformer", backbone="resnet38", resnet38_width=1 / 16,
                     largefov_channels=32, freeze_bn=True)
    model = build_deeplab(cfg, C).eval()
    # Plainly: conv1a at stride 1, b2 / b3 / b4 each halve with a 3x3 stride-2 conv (padding 1) -> ceil(n / 2),
    # three times: ceil(n / 8); b5 dilation 2 (first conv 1), b6 / b7 dilation 4; 4096 / 16 = 256 channels.
    for h, w in ((64, 48), (65, 47), (33, 17)):
        x = torch.randn(1, 3, h, w)
        features = model.backbone(x)
        assert features.shape == (1, 256, math.ceil(h / 8), math.ceil(w / 8))
        assert model(x).shape == (1, C + 1, math.ceil(h / 8), math.ceil(w / 8))
    expect = {"b2.conv_branch2a": (2, 1), "b3.conv_branch2a": (2, 1), "b4.conv_branch2a": (2, 1),
              "b5.conv_branch2a": (1, 1), "b5.conv_branch2b1": (1, 2), "b5_2.conv_branch2a": (1, 2),
              "b6.conv_branch2b1": (1, 4), "b7.conv_branch2b1": (1, 4)}
    modules = dict(model.backbone.named_modules())
    for name, (stride, dilation) in expect.items():
        assert (modules[name].stride[0], modules[name].dilation[0]) == (stride, dilation), name
    # MCTformer's seg/network/resnet38d.py:151,195-211: conv1a and every BatchNorm frozen, b2 trained.
    assert not model.backbone.conv1a.weight.requires_grad
    assert model.backbone.b2.conv_branch2a.weight.requires_grad
    assert not any(p.requires_grad for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)
                   for p in m.parameters())
    model.train()
    assert not any(m.training for m in model.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_resnet38_deeplab_loads_psa_classification_weights(tmp_path):
    from fsae.models.resnet38 import ResNet38

    cfg = _model_cfg(arch="deeplabv1", head="mctformer", backbone="resnet38", resnet38_width=1 / 16,
                     largefov_channels=8)
    source = ResNet38(width=1 / 16)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in source.state_dict().items()}
    state["fc8.weight"] = torch.randn(20, 256, 1, 1)  # PSA's resnet38_cls classifier: ignored
    torch.save(state, tmp_path / "res38_cls.pth")
    model = build_deeplab(cfg, C)
    assert load_pretrained(model, tmp_path / "res38_cls.pth") == {"backbone": True, "head": False}
    torch.testing.assert_close(model.backbone.b4_3.conv_branch2a.weight, state["b4_3.conv_branch2a.weight"])


def test_resnet101s_is_the_ppc_authors_deep_base_dilated_resnet(tmp_path):
    timm = pytest.importorskip("timm")
    cfg = _model_cfg(arch="deeplabv2", head="ppc", backbone="resnet101s", freeze_bn=False)
    model = build_deeplab(cfg, C)
    net = model.backbone.net
    # resnet.py:148-163: three 3x3 convs 3-64 (stride 2), 64-64, 64-128, then BN 128, ReLU, max pool.
    stem = [(m.in_channels, m.out_channels, m.stride[0]) for m in net.conv1 if isinstance(m, torch.nn.Conv2d)]
    assert stem == [(3, 64, 2), (64, 64, 1), (64, 128, 1)] and net.bn1.num_features == 128
    # resnet.py:192-225 (dilated=True, multi_grid=False): layer3 at dilation 2 -> its first block 1, the rest 2;
    # layer4 at dilation 4 -> its first block 2, the rest 4; both at stride 1.
    for layer, blocks, first, rest in (("layer3", 23, 1, 2), ("layer4", 3, 2, 4)):
        got = [getattr(net, layer)[i].conv2.dilation[0] for i in range(blocks)]
        assert got == [first] + [rest] * (blocks - 1), layer
        assert getattr(net, layer)[0].conv2.stride[0] == 1
    assert model.backbone(torch.randn(1, 3, 64, 40)).shape == (1, 2048, 8, 5)
    # PyTorch-Encoding's resnet101s file (resnet.py:16) has these key names: it loads strictly.
    full = timm.create_model("resnet101s", pretrained=False)
    state = {k: torch.randn_like(v) if v.is_floating_point() else v for k, v in full.state_dict().items()}
    assert {"conv1.0.weight", "conv1.1.weight", "conv1.3.weight", "conv1.4.weight", "conv1.6.weight",
            "bn1.weight", "fc.weight"} <= set(state)
    torch.save(state, tmp_path / "resnet101s-03a0f310.pth")
    load_pretrained(model, tmp_path / "resnet101s-03a0f310.pth")
    torch.testing.assert_close(net.layer3[7].conv2.weight, state["layer3.7.conv2.weight"])


# ------------------------------------------------------------------------------------------ optimiser


def test_ppc_optimiser_groups_biases_twice_without_decay_and_leaves_bn_affine_out():
    # train.py:71-80: backbone conv weights lr / decay, backbone conv biases 2 lr / no decay, head conv
    # weights 10 lr / decay, head conv biases 20 lr / no decay; BN parameters in no group (deeplabv1.py:53-69).
    cfg = SegConfig()
    cfg.model = _model_cfg(arch="deeplabv1", head="ppc", backbone="tinycnn", width=8, largefov_channels=16,
                           freeze_bn=False)
    cfg.optim.lr, cfg.optim.weight_decay = 1e-3, 5e-4
    cfg.optim.bias_lr_mult, cfg.optim.bias_weight_decay, cfg.optim.train_bn_affine = 2.0, False, False
    model = build_deeplab(cfg.model, C)
    optimizer = build_seg_optimizer(model, cfg)
    got = {id(p): (g["lr"], g["weight_decay"]) for g in optimizer.param_groups for p in g["params"]}
    want = {}
    for part, mult in ((model.backbone, 1), (model.head, 10)):
        for m in part.modules():
            if isinstance(m, torch.nn.Conv2d):
                want[id(m.weight)] = (1e-3 * mult, 5e-4)
                if m.bias is not None:
                    want[id(m.bias)] = (2e-3 * mult, 0.0)
    assert got.keys() == want.keys()
    for key, (lr, wd) in want.items():
        assert got[key] == (pytest.approx(lr), wd)
    # The default keeps one group per part with every trainable parameter (BN affine included).
    cfg.optim.bias_lr_mult, cfg.optim.bias_weight_decay, cfg.optim.train_bn_affine = 1.0, True, True
    groups = build_seg_optimizer(model, cfg).param_groups
    assert [g["lr"] for g in groups] == [pytest.approx(1e-3), pytest.approx(1e-2)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


# ------------------------------------------------------------------------------------------ inference


def test_fusions_equal_plain_loops():
    torch.manual_seed(0)
    model = torch.nn.Conv2d(3, C + 1, 3, padding=1).eval()
    x = torch.randn(1, 3, 12, 10)
    scales = (0.5, 1.0, 1.5)

    def logits_at(s, flip):
        xi = x.flip(-1) if flip else x
        xi = F.interpolate(xi, scale_factor=s, mode="bilinear", align_corners=False,
                           recompute_scale_factor=False) if s != 1.0 else xi
        out = F.interpolate(model(xi), size=(12, 10), mode="bilinear", align_corners=False)
        return out.flip(-1) if flip else out

    with torch.no_grad():
        all_logits = [logits_at(s, f) for s in scales for f in (False, True)]
        # The PPC authors' test.py:91-92: softmax(mean over the 2 x len(scales) logit maps).
        want = (sum(all_logits) / len(all_logits)).softmax(1)
        torch.testing.assert_close(multiscale_probs(model, x, scales, True, "mean_logits"), want)
        # MCTformer's infer_seg.py:87-98: probs = max(probs, softmax(logits)) from zeros, no flip.
        probs = torch.zeros(1, C + 1, 12, 10)
        for s in scales:
            probs = torch.max(probs, logits_at(s, False).softmax(1))
        torch.testing.assert_close(multiscale_probs(model, x, scales, False, "max_probs"), probs)
        mean = sum(t.softmax(1) for t in all_logits) / len(all_logits)
        torch.testing.assert_close(multiscale_probs(model, x, scales, True, "mean_probs"), mean)


# ------------------------------------------------------------------------------------------ short runs

# CPU-sized overrides: a width-8 tinycnn (the ResNet-38 at 1/16 width for MCTformer's recipe), 48 px crops,
# dilations that fit a 6x6 feature map, a few iterations; everything else is the recipe's.
SHORT = {
    "configs/voc/deeplabv2_r101_ppc.yaml": ["model.backbone=tinycnn", "model.width=8", "model.aspp_rates=[1,2,3,4]",
                                            "model.aspp_channels=16"],
    "configs/voc/deeplabv1_r101_ppc.yaml": ["model.backbone=tinycnn", "model.width=8", "model.largefov_dilation=2",
                                            "model.largefov_channels=32"],
    "configs/voc/deeplab_r38_mct.yaml": ["model.resnet38_width=0.0625", "model.largefov_dilation=2",
                                         "model.largefov_channels=32", "optim.lr=0.01"],
}


@pytest.mark.parametrize("recipe", sorted(SHORT))
def test_short_training_run_on_the_generated_set(recipe, tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    overrides = SHORT[recipe] + [
        f"data.root={root}", "data.num_classes=4", "data.train_split=train", "data.test_split=''",
        "data.crop_size=48", "data.workers=0", "model.weights=null", "train.iterations=40", "train.batch_size=4",
        "train.log_every=1", "train.checkpoint_every=40", "train.device=cpu", "infer.scales=[0.75,1.0,1.25]"]
    args = [f"--set={o}" for o in overrides]
    run = tmp_path / "run"
    gt = root / "SegmentationClass"  # the generated set's true masks stand in for pseudo-masks
    assert main(["seg", "train", str(ROOT / recipe), "--out", str(run), "--masks", str(gt), "--allow-gt", *args]) == 0
    rows = np.loadtxt(run / "metrics.csv", delimiter=",", skiprows=1)
    loss = rows[:, 2]
    assert len(loss) == 40 and np.isfinite(loss).all()
    assert loss[-10:].mean() < 0.8 * loss[:5].mean()
    assert main(["seg", "infer", str(run)]) == 0
    val_ids = read_id_list(root / "ImageSets/Segmentation/val.txt")
    for name in ("val", "val_crf"):
        written = sorted((run / "segment" / name).glob("*.png"))
        assert [p.stem for p in written] == sorted(val_ids)
        assert set(np.unique(np.asarray(Image.open(written[0])))) <= set(range(C + 1))
        assert 0.0 <= read_json(run / "eval" / f"seg_{name}.json")["miou"] <= 1.0


def test_unknown_head_or_fusion_is_one_clear_line(tmp_path, capsys):
    recipe = str(ROOT / "configs/voc/deeplab_r38_mct.yaml")
    for override, says in (("model.head=aspp", "model.head = 'aspp' is not allowed; expected a string (one of "
                                               "deeplab, ppc, mctformer)"),
                           ("model.arch=deeplabv2", "model.head = 'mctformer' is not allowed with model.arch "
                                                   "'deeplabv2'; expected deeplabv1"),
                           ("infer.fuse=median", "infer.fuse = 'median' is not allowed; expected a string (one of "
                                                 "mean_probs, mean_logits, max_probs)")):
        assert main(["seg", "train", recipe, "--out", str(tmp_path / "r"), "--set", override]) == 2
        err = capsys.readouterr().err
        assert says in err and "Traceback" not in err
