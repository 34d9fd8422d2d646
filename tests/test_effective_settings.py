"""The VOC / COCO recipes run what the base repositories' code effectively runs (issue 29).

Each test builds the base code's behaviour from a plainly written reference (torch's own SGD called the way
the base code calls it, the base code's arithmetic written out) and checks fsae's recipe and code against it.
The comment on each check names the upstream file:line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from fsae.config import load_config
from fsae.train import build_optimizer

REPO = Path(__file__).resolve().parents[1]


class _TwoGroups(nn.Module):
    """A backbone layer and a new layer, as the methods' ``param_groups`` give them."""

    def __init__(self):
        super().__init__()
        self.old, self.new = nn.Linear(2, 2), nn.Linear(2, 2)

    def param_groups(self):
        return [{"params": list(self.old.parameters()), "new": False},
                {"params": list(self.new.parameters()), "new": True}]


# recipe -> the base repository's PolyOptimizer line, which calls torch.optim.SGD(params, lr, weight_decay)
POLY_SGD = {
    "voc/cam.yaml": "irn misc/torchutils.py:12",
    "coco/cam.yaml": "irn misc/torchutils.py:12",
    "voc/sipe.yaml": "SIPE tool/torchutils.py:14",
    "voc/sipe_fsae.yaml": "SIPE tool/torchutils.py:14",
    "coco/sipe.yaml": "SIPE tool/torchutils.py:14",
    "coco/sipe_fsae.yaml": "SIPE tool/torchutils.py:14",
    "voc/ppc_eps.yaml": "usr922/wseg esp util/torchutils.py:7",
    "voc/ppc_eps_fsae.yaml": "usr922/wseg esp util/torchutils.py:7",
    "coco/ppc_eps.yaml": "EPS util/torchutils.py:7",
    "coco/ppc_eps_fsae.yaml": "EPS util/torchutils.py:7",
    "voc/ppc_eps_fsae_authors.yaml": "obeychoi0120/wseg ssl util/torchutils.py:6",
    "coco/ppc_eps_fsae_authors.yaml": "obeychoi0120/wseg ssl util/torchutils.py:6",
}


@pytest.mark.parametrize("recipe", sorted(POLY_SGD))
def test_sgd_momentum_is_the_base_code_s_positional_weight_decay(recipe):
    cfg = load_config(REPO / "configs" / recipe)
    model = _TwoGroups()
    wd = cfg.optim.weight_decay
    # The base code: PolyOptimizer(groups with their weight_decay, lr, weight_decay) -> SGD(params, lr, weight_decay),
    # torch's third positional argument being momentum (POLY_SGD[recipe]).
    base = torch.optim.SGD([{"params": g["params"], "weight_decay": wd} for g in model.param_groups()],
                           cfg.optim.lr, wd)
    ours = build_optimizer(model, cfg.optim)
    assert [g["momentum"] for g in ours.param_groups] == [g["momentum"] for g in base.param_groups], POLY_SGD[recipe]
    assert [g["weight_decay"] for g in ours.param_groups] == [g["weight_decay"] for g in base.param_groups]
    assert [g["nesterov"] for g in ours.param_groups] == [g["nesterov"] for g in base.param_groups]


# ---------------------------------------------------------------- the CAM / SIPE backbone as IRN / SIPE train it
def _irn_reference_grads(backbone, classifier, images, labels):
    """IRN's CAM step written out (net/resnet50_cam.py:25-37): FixedBatchNorm (net/resnet50.py:11-14, running
    statistics), stage 2's output detached (:28), GAP then the classifier, multi-label soft margin, on a copy
    with every parameter trainable. -> {parameter name: gradient or None} of ``backbone``, and the loss."""
    import copy

    import torch.nn.functional as F

    backbone, classifier = copy.deepcopy(backbone), copy.deepcopy(classifier)
    for p in backbone.parameters():
        p.requires_grad_(True)  # IRN's optimiser holds them all: the detach alone decides

    def fixed_bn(m, x):
        return F.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias, training=False, eps=m.eps)

    hooks = [m.register_forward_hook(lambda m, inp, out: fixed_bn(m, inp[0]))
             for m in backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    try:
        x = backbone.maxpool(backbone.relu(backbone.bn1(backbone.conv1(images))))
        x = backbone.layer2(backbone.layer1(x)).detach()  # :28
        x = backbone.layer4(backbone.layer3(x))
        logits = classifier(x.mean(dim=(2, 3), keepdim=True)).flatten(1)  # :33-35 gap2d then the 1x1 classifier
        loss = F.multilabel_soft_margin_loss(logits, labels)
    finally:
        for h in hooks:
            h.remove()
    loss.backward()
    return {n: p.grad for n, p in backbone.named_parameters()}, loss.detach()


def _cam_recipe_model(*overrides):
    from fsae.methods import build_method

    cfg = load_config(REPO / "configs/voc/cam.yaml", ["model.backbone=resnet18_irn", "model.weights=null",
                                                      "data.num_classes=3", *overrides])
    torch.manual_seed(0)
    return build_method(cfg.model, num_classes=3)


def _bn_layers(module):
    return [m for m in module.modules() if isinstance(m, nn.BatchNorm2d)]


def test_cam_recipe_backbone_trains_as_irn_s(overrides=()):
    model = _cam_recipe_model(*overrides).train()
    with torch.no_grad():  # non-trivial running statistics, so that batch statistics would differ
        for m in _bn_layers(model.backbone):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    images, labels = torch.randn(2, 3, 64, 64), torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])
    ref, ref_loss = _irn_reference_grads(model.backbone, model.classifier, images, labels)
    stats = [m.running_mean.clone() for m in _bn_layers(model.backbone)]
    loss = model.losses({"label": labels}, model(images, labels))["cls"]
    loss.backward()
    assert torch.allclose(loss, ref_loss, atol=1e-6)  # same forward: running statistics, no batch statistics
    params = dict(model.backbone.named_parameters())
    for name, g in ref.items():
        if g is None:  # conv1, bn1, layer1, layer2: no gradient in IRN, frozen here
            assert params[name].grad is None and not params[name].requires_grad, name
        else:
            assert torch.allclose(params[name].grad, g, atol=1e-6, rtol=1e-4), name
    assert all(torch.equal(a, m.running_mean) for a, m in zip(stats, _bn_layers(model.backbone)))
    trained = {id(p) for g in model.param_groups() for p in g["params"]}
    assert trained == {id(p) for n, p in params.items() if ref[n] is not None} | \
        {id(p) for p in model.classifier.parameters()}


@pytest.mark.parametrize("override", ["model.cam.freeze_bn=false", "model.cam.freeze_low_stages=false"])
def test_the_irn_reference_tells_today_s_cam_apart(override):
    with pytest.raises(AssertionError):  # the check above fails on the behaviour before issue 29
        test_cam_recipe_backbone_trains_as_irn_s((override,))


def test_synthetic_cam_keeps_training_bn_and_low_stages():
    cfg = load_config(REPO / "configs/synthetic/cam.yaml")
    assert not cfg.model.cam.freeze_bn and not cfg.model.cam.freeze_low_stages  # the demo's measured recipe


def test_freeze_low_stages_refuses_a_network_without_resnet_stages():
    from fsae.errors import ConfigError
    from fsae.models.backbones import freeze_low_stages

    with pytest.raises(ConfigError, match="layer3"):
        freeze_low_stages(nn.Sequential(nn.Conv2d(3, 4, 3)))


# ---------------------------------------------------------------- DeepLab V2 as deeplab-pytorch trains it
def _deeplab_pytorch_groups(model, lr, wd):
    """deeplab-pytorch main.py:48-67, 160-181 written out: {id(param): (lr, weight decay)}: every Conv2d
    parameter of the base at 1x with decay, ASPP conv weights at 10x with decay, ASPP conv biases at 20x
    without; BatchNorm parameters in no group."""
    out = {}
    for part, w_mult, b_mult, b_wd in ((model.backbone, 1, 1, wd), (model.head, 10, 20, 0.0)):
        for m in part.modules():
            if isinstance(m, nn.Conv2d):
                out[id(m.weight)] = (w_mult * lr, wd)
                if m.bias is not None:
                    out[id(m.bias)] = (b_mult * lr, b_wd)
    return out


@pytest.mark.parametrize("recipe", ["voc/deeplabv2_r101.yaml", "coco/deeplabv2_r101.yaml"])
def test_deeplabv2_optimiser_groups_are_deeplab_pytorch_s(recipe, tmp_path, monkeypatch):
    from fsae.segment.config import load_seg_config
    from fsae.segment.deeplab import build_deeplab
    from fsae.segment.train import build_seg_optimizer

    monkeypatch.setenv("FSAE_WEIGHTS", str(tmp_path))
    cfg = load_seg_config(REPO / "configs" / recipe, ["model.weights=null"])
    model = build_deeplab(cfg.model, num_classes=3)
    ours = {id(p): (g["lr"], g["weight_decay"]) for g in build_seg_optimizer(model, cfg).param_groups
            for p in g["params"]}
    ref = _deeplab_pytorch_groups(model, cfg.optim.lr, cfg.optim.weight_decay)
    assert set(ours) == set(ref)
    assert all(ours[k] == pytest.approx(ref[k]) for k in ref)
    assert any(v == pytest.approx((20 * cfg.optim.lr, 0.0)) for v in ref.values())  # the ASPP biases exist


def _msc_reference(base, x, scales):
    """deeplab-pytorch libs/models/msc.py:26-47 in training mode, written out."""
    import torch.nn.functional as F

    logits = base(x)
    h, w = logits.shape[-2:]
    pyramid = [base(F.interpolate(x, scale_factor=p, mode="bilinear", align_corners=False)) for p in scales]
    everything = [logits] + [F.interpolate(p, size=(h, w), mode="bilinear", align_corners=False) for p in pyramid]
    return [logits] + pyramid + [torch.max(torch.stack(everything), dim=0)[0]]


def test_msc_training_outputs_and_loss_are_deeplab_pytorch_s():
    from fsae.segment.config import load_seg_config
    from fsae.segment.train import msc_logits, msc_loss, segmentation_loss

    scales = load_seg_config(REPO / "configs/voc/deeplabv2_r101.yaml").train.msc_scales
    assert list(scales) == [0.5, 0.75]  # deeplab-pytorch libs/models/__init__.py:33-39 MSC(..., scales=[0.5, 0.75])
    torch.manual_seed(0)
    base = nn.Conv2d(3, 4, 3, stride=8, padding=1)
    seen = []
    base.register_forward_pre_hook(lambda m, inp: seen.append(tuple(inp[0].shape[-2:])))
    x = torch.randn(2, 3, 65, 65)
    masks = torch.randint(0, 4, (2, 65, 65))
    masks[:, :5] = 255
    ours = msc_logits(base, x, scales)
    assert seen == [(65, 65), (32, 32), (48, 48)]  # 1x, floor(65 * 0.5), floor(65 * 0.75)
    ref = _msc_reference(base, x, scales)
    assert len(ours) == 4 and all(torch.equal(a, b) for a, b in zip(ours, ref))
    loss, _ = msc_loss(ours, masks)
    assert torch.allclose(loss, sum(segmentation_loss(r, masks)[0] for r in ref))  # main.py:231-236 the sum
    assert len(msc_logits(base, x, None)) == 1  # off (the default): the crop's logits only


# ---------------------------------------------------------------- protocols: PPC's sweep, EPS and its copy
def _wseg_eval_thresholds(max_th):
    """obeychoi0120/wseg@ssl eval.py:155-156: ``for i in range(args.max_th): t = i / 100.0``."""
    return [i / 100.0 for i in range(max_th)]


@pytest.mark.parametrize("name, max_th", [("ppc", 50),             # wseg@ssl script/voc_ppc1.sh:86 --max_th 50
                                          ("eps_wseg", 50),        # wseg@ssl script/voc_eps.sh:64 --max_th 50
                                          ("eps_wseg_coco", 30)])  # wseg@ssl script/coco_eps.sh:63 --max_th 30
def test_sweeps_are_the_authors_scripts(name, max_th):
    from fsae.protocol import PROTOCOLS

    assert PROTOCOLS[name].eval_mode == "sweep"
    assert PROTOCOLS[name].thresholds() == pytest.approx(_wseg_eval_thresholds(max_th))


def test_eps_scores_a_fixed_threshold_and_its_copies_their_own():
    from fsae.protocol import PROTOCOLS

    assert PROTOCOLS["eps"].eval_mode == "fixed"
    assert PROTOCOLS["eps"].thresholds() == [0.20]  # halbielee/EPS script/coco_eps.sh:43, voc12_eps.sh:41 --thr 0.20
    assert PROTOCOLS["eps_wseg"].threshold == 0.20  # wseg@ssl script/voc_eps.sh:44
    assert PROTOCOLS["eps_wseg_coco"].threshold == 0.22  # wseg@ssl script/coco_eps.sh:44
    for name in ("eps_wseg", "eps_wseg_coco"):  # wseg@ssl voc_eps.sh:50-51, coco_eps.sh:50-51 --crf_t 5 --crf_alpha 8
        assert (PROTOCOLS[name].crf_iterations, PROTOCOLS[name].bg_power) == (5, 8.0)


def test_a_recipe_picks_a_named_protocol_and_old_eps_runs_still_resolve():
    from fsae.config import Config
    from fsae.errors import ConfigError
    from fsae.protocol import resolve_protocol

    old = Config().to_dict()
    old["model"]["method"] = "eps"
    del old["eval"]["protocol"]  # a run saved before the field existed
    cfg = Config.from_dict(old)
    assert resolve_protocol(cfg).eval_mode == "fixed" and resolve_protocol(cfg).threshold == 0.20
    cfg.eval.protocol = "eps_wseg_coco"
    assert resolve_protocol(cfg).sweep == (0.0, 0.29, 0.01)
    cfg.eval.sweep = [0.0, 0.1, 0.05]  # the recipe's eval.* fields still apply on top
    assert resolve_protocol(cfg).thresholds() == pytest.approx([0.0, 0.05, 0.1])
    cfg.eval.protocol = "nope"
    with pytest.raises(ConfigError, match="eval.protocol 'nope'"):
        resolve_protocol(cfg)


# ---------------------------------------------------------------- recipe path joins
def _voc_tree(root: Path, sal: Path):
    (root / "ImageSets/Segmentation").mkdir(parents=True)
    (root / "ImageSets/Segmentation/train.txt").write_text("a\n")
    (root / "cls_labels.json").write_text('{"a": [1]}')
    sal.mkdir(parents=True, exist_ok=True)


def test_relative_saliency_dir_lies_below_data_root(tmp_path, monkeypatch):
    from fsae.data.voc import VOCDataset
    from fsae.train import with_absolute_data_paths

    root = tmp_path / "elsewhere/VOC2012"
    _voc_tree(root, root / "SALImages")
    monkeypatch.chdir(tmp_path)  # no SALImages here: the recipe's value must resolve under data.root
    assert VOCDataset(root, "train", saliency_dir="SALImages").saliency_dir == root / "SALImages"
    assert VOCDataset(root, "train", saliency_dir=str(tmp_path / "abs")).saliency_dir == tmp_path / "abs"
    cfg = load_config(REPO / "configs/voc/ppc_eps.yaml", [f"data.root={root}"])
    assert Path(with_absolute_data_paths(cfg).data.saliency_dir) == root / "SALImages"
    # the cwd-relative form of older recipes still finds its folder
    (tmp_path / "data/old/SALImages").mkdir(parents=True)
    assert VOCDataset(root, "train", saliency_dir="data/old/SALImages").saliency_dir == Path("data/old/SALImages")


def test_check_training_data_finds_the_saliency_folder_below_root(tmp_path, monkeypatch):
    from fsae.data.check import check_training_data

    root = tmp_path / "VOC2012"
    _voc_tree(root, root / "SALImages")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(REPO / "configs/voc/ppc_eps.yaml", [f"data.root={root}", "data.train_split=train",
                                                          "train.val_every=0"])
    problems = [str(p) for p in check_training_data(cfg)]
    assert not any("saliency folder not found" in p for p in problems), problems


def test_res38_cls_recipes_name_the_weights_folder():
    import yaml

    from fsae.weights import DEFAULT_FOLDER

    for recipe, section in (("voc/psa.yaml", "net"), ("voc/deeplab_r38_mct.yaml", "model")):
        value = yaml.safe_load((REPO / "configs" / recipe).read_text())[section]["weights"]
        assert Path(value) == DEFAULT_FOLDER / "res38_cls.pth", recipe  # not relative to the working directory


# ---------------------------------------------------------------- SIPE: an image and its flip fused before the seeds
def _sipe_cam_reference(model, image, label):
    """SIPE network/resnet50_SIPE.py:121-154 (class CAM) on ``[image, flipped image]``, written out with
    fsae's background-last layout: CAMs and hierarchical features summed over the pair (:140-141), then
    norm_cam (:143-147), seeds on the fused features, gated by the label after the argmax (:149), prototypes and
    the IS-CAM (:150-151). -> (C + 1, h, w)."""
    import torch.nn.functional as F

    from fsae.methods.sipe import hierarchical_features, is_cam, seed_prototypes, structure_seeds

    x = torch.cat([image, image.flip(-1)])
    x1, x2, x3, x4 = model.features(x)
    sides = [side(f) for side, f in zip(model.sides, (x1, x2, x3, x4))]
    hie = hierarchical_features(sides, x3.shape[-2:])
    cam = model.classifier(x4)
    cam, hie = (cam[0] + cam[1].flip(-1))[None], (hie[0] + hie[1].flip(-1))[None]  # :140-141
    norm = F.relu(cam)
    norm = norm / (F.adaptive_max_pool2d(norm, 1) + 1e-5)
    norm = torch.cat([norm, 1 - norm.max(dim=1, keepdim=True).values], dim=1)
    norm = F.interpolate(norm, size=hie.shape[-2:], mode="bilinear", align_corners=True)
    gate = torch.cat([label, torch.ones(1, 1)], dim=1)  # make_cam.py:52 the background always present
    seeds = structure_seeds(norm, gate, hie)
    return is_cam(seed_prototypes(seeds, hie), hie)[0]


def test_sipe_fuses_an_image_and_its_flip_before_seeds_and_prototypes():
    from fsae.infer import multiscale_maps
    from fsae.methods.sipe import SIPE

    torch.manual_seed(0)
    model = SIPE(3, backbone="resnet18", channels=[8, 16, 16, 32], side_channels=[4, 4, 8, 8]).eval()
    image, label = torch.randn(1, 3, 64, 64), torch.tensor([[1.0, 0.0, 1.0]])
    ref = _sipe_cam_reference(model, image, label)
    with torch.no_grad():
        out = multiscale_maps(model, image, scales=[1.0], flip=True, labels=label, resize="bilinear")
        per_view = model.cam_with_background(torch.cat([image, image.flip(-1)]), label.repeat(2, 1))
    size = image.shape[-2:]
    want = torch.nn.functional.interpolate(ref[None], size=size, mode="bilinear", align_corners=False)[0]
    assert torch.allclose(out["cams"][0], want[:-1] * torch.tensor([1.0, 0, 1.0])[:, None, None], atol=1e-5)
    assert torch.allclose(out["background"][0], want[-1], atol=1e-5)
    assert want[:-1].abs().sum() > 0
    old = per_view[0][:1] + per_view[0][1:].flip(-1)  # the IS-CAM per view, summed after (before issue 29)
    old = torch.nn.functional.interpolate(old, size=size, mode="bilinear", align_corners=False)[0]
    assert not torch.allclose(old, out["cams"][0], atol=1e-3)  # the reference tells the two apart


# ---------------------------------------------------------------- COCO PPC + FSAE: the matched schedule
def _wseg_max_epochs(max_iters, iter_size, num_data=82081, batch_size=16):
    """obeychoi0120/wseg@ssl contrast_train.py:160-162: int(max_iters * iter_size // (num_data // batch_size))."""
    return int(max_iters * iter_size // (num_data // batch_size))


def test_coco_ppc_base_at_the_authors_fsae_schedule_is_one_recipe_away():
    authors = load_config(REPO / "configs/coco/ppc_eps_fsae_authors.yaml")
    base = load_config(REPO / "configs/coco/ppc_eps.yaml")
    matched = load_config(REPO / "configs/coco/ppc_eps_200ep.yaml")
    assert base.train.epochs == _wseg_max_epochs(256500, 1) == 50  # ssl script/coco_ppc0.sh:29-30
    assert authors.train.epochs == matched.train.epochs == _wseg_max_epochs(513000, 2) == 200  # coco_ppc1.sh:29-30
    base.train.epochs, base.name = matched.train.epochs, matched.name
    assert base == matched  # nothing else differs


# ---------------------------------------------------------------- MCTformer: the LR moves once per epoch
def test_mctformer_lr_follows_timm_stepped_once_per_epoch():
    from timm.scheduler.cosine_lr import CosineLRScheduler

    from fsae.train import learning_rate

    cfg = load_config(REPO / "configs/voc/mctformer.yaml")
    o, spe = cfg.optim, 7
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=o.lr)
    # MCTformer main.py:297 (DeiT's loop): train epoch e, then lr_scheduler.step(e); timm's create_scheduler
    # with --sched cosine --warmup-epochs 5 --warmup-lr 1e-6 --min-lr 1e-5 (main.py:52-69)
    sched = CosineLRScheduler(opt, t_initial=cfg.train.epochs, lr_min=o.min_lr, warmup_lr_init=o.warmup_lr,
                              warmup_t=int(o.warmup_epochs), cycle_limit=1)
    total = cfg.train.epochs * spe
    for epoch in range(cfg.train.epochs):
        want = opt.param_groups[0]["lr"]
        for step in (epoch * spe, epoch * spe + spe - 1):
            assert learning_rate(o, step, total, spe) == pytest.approx(want, rel=1e-9), (epoch, step)
        sched.step(epoch)
    o.lr_step = "update"  # today's per-update schedule differs inside an epoch
    assert learning_rate(o, 3 * spe + 3, total, spe) != pytest.approx(learning_rate(o, 3 * spe, total, spe))
