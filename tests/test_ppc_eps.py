"""EPS and PPC: every loss term against its formula on small tensors, CAM inference, optimizer groups,
saliency in the batch, the recipes, and training end to end on the generated set."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsae.augment import apply_geometry, random_geometry
from fsae.cli import main as cli
from fsae.config import Config, ConfigError, load_config
from fsae.evaluate import load_seed
from fsae.infer import multiscale_cam, normalise_seed
from fsae.methods import build_method
from fsae.methods.eps import EPS, eps_saliency_loss
from fsae.methods.ppc import (PPC, adaptive_min_pooling_loss, equivariance_losses, intra_view_contrast,
                              min_max_norm, pcm_propagate, pcm_seed, pixel_prototype_contrast,
                              pseudo_labels_and_prototypes, top_class_onehot)
from fsae.train import TrainViews, build_optimizer, train
from tests.conftest import assert_finished_without_nan, assert_nan_stops_training

REPO = Path(__file__).resolve().parents[1]


def logits_of(probs):
    """Logits whose softmax over dim 1 is ``probs`` (B, K, h, w)."""
    return torch.tensor(probs, dtype=torch.float64).log()


# --- EPS saliency loss ---------------------------------------------------------------------------------

# Softmax probabilities (class 1, class 2, class 3, background) of a 2x2 map, pixels in raster order.
PROBS = [[0.6, 0.1, 0.2, 0.1], [0.5, 0.2, 0.1, 0.2], [0.1, 0.6, 0.1, 0.2], [0.1, 0.1, 0.2, 0.6]]


def eps_inputs():
    probs = torch.tensor(PROBS, dtype=torch.float64).t().reshape(1, 4, 2, 2)
    scores = probs.log().requires_grad_(True)
    saliency = torch.tensor([[[1.0, 1.0], [0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)  # class 3 absent
    return scores, saliency, labels


def test_eps_loss_by_hand():
    scores, saliency, labels = eps_inputs()
    # round(p1) = [1, 0, 0, 0] (0.5 rounds to even) overlaps the saliency on 1 of 1 pixel: ratio
    # 1 / (1 + 4 * 1e-4) > 0.4, salient. round(p2) = [0, 0, 1, 0]: ratio 0, a co-occurring class ->
    # background with the background channel. Class 3 (absent) is in neither map.
    # fg = p1 = [.6, .5, .1, .1]; bg = p2 + p_bg = [.2, .4, .8, .7].
    # alpha 0.5: predicted = .5 fg + .5 (1 - bg) = [.7, .55, .15, .2]; errors vs [1, 1, 0, 0]:
    # [-.3, -.45, .15, .2] -> mean square (.09 + .2025 + .0225 + .04) / 4 = 0.08875.
    loss, predicted = eps_saliency_loss(scores, saliency, labels, tau=0.4, alpha=0.5)
    assert loss.item() == pytest.approx(0.08875)
    np.testing.assert_allclose(predicted.detach().flatten().numpy(), [0.7, 0.55, 0.15, 0.2])
    # alpha 0.9 (the COCO recipe): [.62, .51, .11, .12] -> (.1444 + .2401 + .0121 + .0144) / 4.
    assert eps_saliency_loss(scores, saliency, labels, tau=0.4, alpha=0.9)[0].item() == pytest.approx(0.10275)
    # tau above class 1's ratio (0.9996): no class is salient; predicted = .5 (1 - p1 - p2 - p_bg) = .5 p3.
    _, predicted = eps_saliency_loss(scores, saliency, labels, tau=0.99999, alpha=0.5)
    np.testing.assert_allclose(predicted.detach().flatten().numpy(), [0.1, 0.05, 0.05, 0.1])
    # Gradient: the ratios are constants, so d loss / d p is that of mean((a fg + (1-a)(1-bg) - s)^2).
    loss.backward()
    probs = torch.tensor(PROBS, dtype=torch.float64).t().reshape(1, 4, 2, 2).requires_grad_(True)
    plain = ((0.5 * probs[:, 0] + 0.5 * (1 - probs[:, 1] - probs[:, 3]) - saliency) ** 2).mean()
    (grad_p,) = torch.autograd.grad(plain, probs)
    # chain rule through the softmax: d/dz_k = p_k (g_k - sum_j p_j g_j)
    expected = probs * (grad_p - (probs * grad_p).sum(1, keepdim=True))
    torch.testing.assert_close(scores.grad, expected.detach())


def test_eps_saliency_is_resized_by_nearest_neighbour():
    scores, saliency, labels = eps_inputs()
    big = torch.full((1, 4, 4), 0.5, dtype=torch.float64)
    big[0, ::2, ::2] = saliency[0]  # nearest 4 -> 2 samples rows/cols 0 and 2
    assert eps_saliency_loss(scores, big, labels)[0].item() == pytest.approx(0.08875)


# --- the PPC / SEAM terms -----------------------------------------------------------------------------

def test_adaptive_min_pooling_by_hand():
    cams = torch.tensor([[[[-1.0, 2.0], [0.5, 3.0]], [[0.2, 1.0], [0.1, -2.0]]]])
    # per-pixel max over classes: [.2, 2, .5, 3]; lowest k = 4 * .25 = 1 value: .2
    assert adaptive_min_pooling_loss(cams).item() == pytest.approx(0.2)
    # k = 2: (.2 + .5) / 2; negative values count as 0 (ReLU)
    assert adaptive_min_pooling_loss(cams, 0.5).item() == pytest.approx(0.35)
    assert adaptive_min_pooling_loss(-cams.abs(), 0.5).item() == 0.0


def test_min_max_norm_and_top_class_onehot_by_hand():
    x = torch.tensor([[[[-1.0, 1.0], [2.0, 3.0]]]])
    # ReLU -> [0, 1, 2, 3]; (p - 0 - eps) / (3 - 0 + eps), clipped at 0
    np.testing.assert_allclose(min_max_norm(x).flatten().numpy(), [0, 1 / 3, 2 / 3, 1], atol=1e-5)
    maps = torch.tensor([[[[0.2, 0.9]], [[0.5, 0.9]], [[0.7, 0.1]]]])  # (1, C+1=3, 1, 2), background last
    out = top_class_onehot(maps)
    # pixel 0: class 2 (0.5) is the top foreground, class 1 zeroed; pixel 1: a tie, both kept; background kept
    np.testing.assert_allclose(out[0, :, 0].numpy(), [[0.0, 0.9], [0.5, 0.9], [0.7, 0.1]])


def plain_norm(x):
    """SEAM's max_norm written per channel with Python loops."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for k in range(x.shape[1]):
            p = x[b, k].clamp(min=0)
            out[b, k] = (p - p.min() - 1e-5).clamp(min=0) / (p.max() - p.min() + 1e-5)
    return out


def test_equivariance_losses_equal_the_formula():
    torch.manual_seed(0)
    b, c, h, w = 2, 3, 3, 3
    cams1, cams2, rv1, rv2 = (torch.randn(b, c + 1, h, w, requires_grad=True) for _ in range(4))
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    er, ecr = equivariance_losses(cams1, cams2, rv1, rv2, labels, fraction=0.2)
    gate = torch.cat([labels, torch.ones(b, 1)], 1)[:, :, None, None]
    n1, n2 = plain_norm(cams1.detach()) * gate, plain_norm(cams2.detach()) * gate
    # ER: mean |.| over the C foreground channels and all pixels.
    assert er.item() == pytest.approx((n1[:, :c] - n2[:, :c]).abs().mean().item(), rel=1e-6)
    expected_ecr = 0.0  # ecr1 = |onehot(view 2) - rv1|, ecr2 = |onehot(view 1) - rv2|
    for target_src, rv in ((n2, rv1), (n1, rv2)):
        target = target_src.clone()
        target[:, c] = 1 - target[:, :c].max(1).values
        for i in range(b):
            for y in range(h):
                for x in range(w):
                    top = target[i, :c, y, x].max()
                    for k in range(c):
                        if target[i, k, y, x] < top:
                            target[i, k, y, x] = 0
        diff = (target - plain_norm(rv.detach()) * gate).abs().reshape(b, -1)
        k = int((c + 1) * h * w * 0.2)  # 7 of 36 values per image
        expected_ecr += diff.sort(dim=1, descending=True).values[:, :k].mean().item()
    assert ecr.item() == pytest.approx(expected_ecr, rel=1e-6)
    # ECR's targets are detached: its gradient reaches only the refined CAMs.
    grads = torch.autograd.grad(ecr, [cams1, cams2, rv1, rv2], allow_unused=True)
    assert all(g is None or g.abs().sum() == 0 for g in grads[:2]) and grads[2].abs().sum() > 0


def test_equivariance_resizes_view_one_to_view_two():
    torch.manual_seed(1)
    cams1, rv1 = torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8)
    cams2, rv2 = torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 4)
    labels = torch.tensor([[1.0, 1.0]])
    up = lambda x: F.interpolate(x, size=(4, 4), mode="bilinear", align_corners=True)  # noqa: E731
    er, _ = equivariance_losses(cams1, cams2, rv1, rv2, labels)
    assert er.item() == pytest.approx((up(plain_norm(cams1)) - plain_norm(cams2))[:, :2].abs().mean().item(), rel=1e-6)


def test_pseudo_labels_and_prototypes_by_hand():
    cams = torch.zeros(1, 3, 2, 2)
    cams[0, 0] = torch.tensor([[0.0, 1.0], [2.0, 4.0]])  # class 1: normalised ~[0, .25, .5, 1]
    cams[0, 1] = torch.tensor([[3.0, 1.0], [0.0, 0.0]])  # class 2 (absent): ~[1, 1/3, 0, 0]
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, -1.0]]).t().reshape(1, 2, 2, 2)
    labels = torch.tensor([[1.0, 0.0]])
    pseudo, protos = pseudo_labels_and_prototypes(cams, feats, labels, bg_score=0.1, divisor=1)
    # argmax of (n1 * 1, n2 * 0, 0.1): pixel 0 has n1 = 0 -> background (channel 2), the others class 1.
    assert pseudo.tolist() == [2, 0, 0, 0]
    f = feats[0].reshape(2, -1).t()  # (4, D)
    n1 = torch.tensor([0.0, 1.0, 2.0, 4.0])
    n1 = torch.where(n1 < 1e-5, torch.zeros(4), n1)
    n1 = (n1 - 1e-5) / (4 + 1e-5)
    expected1 = F.normalize((n1[:, None] * f).sum(0) / n1.sum(), dim=0)
    torch.testing.assert_close(protos[0], expected1)
    # Background: every pixel scores 0.1, so its prototype is the normalised mean feature.
    torch.testing.assert_close(protos[2], F.normalize(f.sum(0), dim=0))
    # divisor 4 keeps the top h*w/4 = 1 pixel per channel: class 2's prototype is pixel 0's feature.
    _, protos = pseudo_labels_and_prototypes(cams, feats, labels, bg_score=0.1, divisor=4)
    torch.testing.assert_close(protos[1], F.normalize(f[0], dim=0))
    torch.testing.assert_close(protos[0], F.normalize(f[3], dim=0))


def ce_loop(f, protos, y, t):
    """Mean over pixels of -log(exp(f_i.p_{y_i}/t) / sum_k exp(f_i.p_k/t)), written with a loop."""
    total = 0.0
    for i in range(f.shape[0]):
        s = [math.exp(float(f[i] @ protos[k]) / t) for k in range(protos.shape[0])]
        total += -math.log(s[int(y[i])] / sum(s))
    return total / f.shape[0]


def test_cross_view_contrast_pairs_views_prototypes_and_labels():
    torch.manual_seed(2)
    b, c, d = 2, 3, 5
    rv1, rv2 = torch.randn(b, c + 1, 4, 4), torch.randn(b, c + 1, 4, 4)
    proj1 = torch.randn(b, d, 4, 4, requires_grad=True)
    proj2 = torch.randn(b, d, 4, 4, requires_grad=True)
    rv1.requires_grad_(True)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 1]])
    terms = pixel_prototype_contrast(rv1, rv2, proj1, proj2, labels, bg_score=0.1, temperature=0.1,
                                     weight=0.1, divisor=4, generator=torch.Generator().manual_seed(0))
    y1, p1 = pseudo_labels_and_prototypes(rv1.detach(), proj1.detach(), labels, 0.1, 4)
    y2, p2 = pseudo_labels_and_prototypes(rv2, proj2.detach(), labels, 0.1, 4)
    f1 = F.normalize(proj1.detach().permute(0, 2, 3, 1).reshape(-1, d), dim=-1)
    f2 = F.normalize(proj2.detach().permute(0, 2, 3, 1).reshape(-1, d), dim=-1)
    cross_prototype = 0.1 * (ce_loop(f1, p2, y1, 0.1) + ce_loop(f2, p1, y2, 0.1)) / 2
    cross_label = 0.1 * (ce_loop(f1, p1, y2, 0.1) + ce_loop(f2, p2, y1, 0.1)) / 2
    assert terms["cross_prototype"].item() == pytest.approx(cross_prototype, rel=1e-5)
    assert terms["cross_label"].item() == pytest.approx(cross_label, rel=1e-5)
    gen = torch.Generator().manual_seed(0)
    intra = 0.1 * (intra_view_contrast(f1, p1, y1, 0.1, generator=gen)
                   + intra_view_contrast(f2, p2, y2, 0.1, generator=gen)) / 2
    assert terms["intra"].item() == pytest.approx(intra.item(), rel=1e-5)
    total = terms["contrast"]
    assert total.item() == pytest.approx(cross_prototype + cross_label + intra.item(), rel=1e-5)
    # Prototypes and pseudo-labels carry no gradient: the refined CAMs get none, the projections do.
    total.backward()
    assert rv1.grad is None and proj1.grad.abs().sum() > 0 and proj2.grad.abs().sum() > 0


def test_intra_view_contrast_hard_sampling_by_hand():
    # 5 prototypes (C+1 = 5): hard negatives = those ranked 4th and 5th by similarity (skip 3).
    protos = F.normalize(torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1]]), dim=1)
    torch.manual_seed(3)
    feats = F.normalize(torch.randn(7, 3), dim=1)
    pseudo = torch.tensor([0, 0, 0, 1, 1, 1, 1])  # class 2 has n = 4 pixels, class 1 has n = 3
    t = 0.1
    loss = intra_view_contrast(feats, protos, pseudo, t, generator=torch.Generator().manual_seed(5))

    def pixel_loss(i):
        sims = feats[i] @ protos.t()
        order = sims.argsort(descending=True).tolist()
        negatives = order[3:13]
        terms = [float(sims[pseudo[i]]) / t] + [float(sims[n]) / t for n in negatives]
        return -terms[0] + math.log(sum(math.exp(v) for v in terms))

    gen = torch.Generator().manual_seed(5)
    per_class = []
    for cls in (0, 1):
        idx = [i for i in range(7) if pseudo[i] == cls]
        n = len(idx)
        random_half = [idx[j] for j in torch.randperm(n, generator=gen)[: n // 2].tolist()]
        sim_own = [(float(feats[i] @ protos[cls]) + 1) / 2 for i in idx]
        ascending = [idx[j] for j in np.argsort(sim_own, kind="stable")]
        top = int(0.6 * n)
        semi_hard = ascending[:top][top - n // 2:]
        chosen = random_half + semi_hard
        per_class.append(sum(pixel_loss(i) for i in chosen) / len(chosen))
    assert loss.item() == pytest.approx(sum(per_class) / 2, rel=1e-5)


def test_pcm_seed_and_propagation_equal_the_formula():
    torch.manual_seed(4)
    cams = torch.randn(1, 3, 2, 3)
    seed = pcm_seed(cams)
    relu = cams.clamp(min=0)
    norm = (relu - 1e-5).clamp(min=0) / (relu.amax((2, 3), keepdim=True) + 1e-5)
    top = norm[:, :2].max(1, keepdim=True).values
    expected = torch.cat([norm[:, :2] * (norm[:, :2] >= top), 1 - top], 1)
    torch.testing.assert_close(seed, expected)
    feats = torch.randn(1, 4, 2, 3)
    out = pcm_propagate(seed, feats)
    f = feats[0].reshape(4, -1)
    f = f / (f.norm(dim=0, keepdim=True) + 1e-5)
    s = seed[0].reshape(3, -1)
    for j in range(6):
        a = [max(float(f[:, i] @ f[:, j]), 0.0) for i in range(6)]
        want = sum(s[:, i] * a[i] for i in range(6)) / (sum(a) + 1e-5)
        torch.testing.assert_close(out[0].reshape(3, -1)[:, j], want)


# --- the methods -----------------------------------------------------------------------------------------

def small_ppc(**kw):
    torch.manual_seed(0)
    return PPC(3, backbone="tinycnn", output_stride=8, width=8, **kw)


def test_ppc_forward_shapes_and_one_backbone_pass():
    model = small_ppc()
    calls = []
    model.backbone.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    out = model(x, labels)
    assert calls == [(2, 3, 64, 64)]  # the FSAE strong view costs one forward
    assert out.score_map.shape == (2, 4, 8, 8) and out.logits.shape == (2, 3)
    torch.testing.assert_close(out.logits, out.score_map[:, :3].mean((2, 3)))
    assert out.extras["cams_rv"].shape == (2, 4, 8, 8) and out.extras["proj"].shape == (2, 128, 8, 8)
    terms = model.losses({"label": labels, "saliency": torch.rand(2, 64, 64)}, out)
    assert calls[1] == (2, 3, 128, 128)  # the second view (128 x 128) runs inside losses()
    assert set(terms) == {"cls", "sal", "er", "ecr", "contrast"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in terms.values())
    with pytest.raises(ConfigError, match="saliency_dir"):
        model.losses({"label": labels}, out)


def test_eps_method_terms():
    cfg = Config()
    cfg.model.method, cfg.model.width, cfg.model.eps.alpha = "eps", 8, 0.9
    torch.manual_seed(6)
    model = build_method(cfg.model, 3)
    assert isinstance(model, EPS) and not isinstance(model, PPC)
    x, sal = torch.randn(2, 3, 32, 32), torch.rand(2, 32, 32)
    labels = torch.tensor([[1.0, 0, 0], [0, 1, 1]])
    out = model(x, labels)
    terms = model.losses({"label": labels, "saliency": sal}, out)
    assert set(terms) == {"cls", "sal"}
    torch.testing.assert_close(terms["cls"], F.multilabel_soft_margin_loss(out.score_map[:, :3].mean((2, 3)), labels))
    torch.testing.assert_close(terms["sal"], eps_saliency_loss(out.score_map, sal, labels, 0.4, 0.9)[0])


def test_eps_cam_inference_fits_the_multiscale_merge():
    torch.manual_seed(5)
    model = EPS(3, backbone="tinycnn", output_stride=8, width=8).eval()
    images = torch.randn(1, 3, 40, 48)
    label = torch.tensor([1.0, 0.0, 1.0])
    merged = multiscale_cam(model, images, (0.5, 1.0), flip=True)
    expected = torch.zeros(3, 40, 48)
    with torch.no_grad():
        for s in (0.5, 1.0):
            x = F.interpolate(images, scale_factor=s, mode="bilinear", align_corners=False) if s != 1 else images
            for flip in (False, True):
                xi = x.flip(-1) if flip else x
                prob = model.classifier(model.backbone(xi)).softmax(1)[:, :3]  # softmax over C+1, foreground kept
                prob = F.interpolate(prob, size=(40, 48), mode="bilinear", align_corners=False)[0]
                expected += prob.flip(-1) if flip else prob
    torch.testing.assert_close(merged[0], expected)
    keys, cams = normalise_seed(merged[0], label)
    assert keys.tolist() == [1, 3]
    np.testing.assert_allclose(cams, (expected[[0, 2]] / (expected[[0, 2]].amax((1, 2), keepdim=True) + 1e-5)).numpy(),
                               rtol=1e-6)


def test_optimizer_groups_and_weight_decay():
    cfg = Config()
    cfg.model.method, cfg.model.backbone = "ppc", "resnet38"
    cfg.model.resnet38.width = 0.0625
    cfg.optim.name, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.new_layer_lr_mult = "sgd", 0.01, 5e-4, 10.0
    cfg.optim.momentum = 0.9
    model = build_method(cfg.model, 3)
    opt = build_optimizer(model, cfg.optim)
    groups = [(g["lr"], g["weight_decay"], g["momentum"]) for g in opt.param_groups]
    # ResNet-38 convs have no bias and its BN is frozen: backbone weights x1, new weights x10 (no new biases)
    assert groups == [(pytest.approx(0.01), 5e-4, 0.9), (pytest.approx(0.1), 5e-4, 0.9)]
    n_trained = sum(len(g["params"]) for g in opt.param_groups)
    assert n_trained == sum(1 for p in model.parameters() if p.requires_grad)
    assert not any(p is model.backbone.conv1a.weight for g in opt.param_groups for p in g["params"])
    # A backbone with biases (trainable BN): biases x2 without weight decay.
    cfg.model.backbone = "tinycnn"
    opt = build_optimizer(build_method(cfg.model, 3), cfg.optim)
    assert [(round(g["lr"], 6), g["weight_decay"]) for g in opt.param_groups] == [
        (0.01, 5e-4), (0.02, 0.0), (0.1, 5e-4)]
    # The plain CAM keeps its two groups: x1 and x new_layer_lr_mult.
    cfg.model.method = "cam"
    opt = build_optimizer(build_method(cfg.model, 3), cfg.optim)
    assert [round(g["lr"], 6) for g in opt.param_groups] == [0.01, 0.1]


def test_saliency_follows_the_crop_geometry(tiny_synthetic):
    root, _ = tiny_synthetic
    image = (np.random.default_rng(0).random((50, 70, 3)) * 255).astype(np.uint8)
    gen = torch.Generator().manual_seed(0)
    geo = random_geometry(image, long_side=(60, 90), crop_size=64, generator=gen)
    # The image's own first channel, replayed, is the crop's first channel (padding 0).
    replay = apply_geometry(image[:, :, 0], geo["params"], (64, 64))
    torch.testing.assert_close(replay, geo["image"][0])
    cfg = load_config(REPO / "configs/synthetic/ppc_eps.yaml",
                      [f"data.root={root}", f"data.saliency_dir={root}/saliency", "data.crop_size=80",
                       "data.long_side=[56, 72]"])
    from fsae.data import build_dataset

    views = TrainViews(build_dataset(cfg.data, "train", with_saliency=True), cfg.data, seed=0)
    sample = views[0]
    sal = sample["saliency"]
    assert sal.shape == (80, 80) and sal.dtype == torch.float32 and 0 <= sal.min() and sal.max() <= 1
    assert (sal[~sample["valid"]] == 0).all()
    # The saliency map is the blurred GT foreground: it is high where the cropped mask is foreground.
    fg = (sample["mask"] > 0) & (sample["mask"] != 255)
    assert sal[fg].mean() > 0.5 > sal[sample["valid"] & (sample["mask"] == 0)].mean()


# --- recipes --------------------------------------------------------------------------------------------

VOC = {
    "data.kind": "voc", "data.num_classes": 20, "data.train_split": "train_aug", "data.mask_dir": "SegmentationClassAug",
    "data.saliency_dir": "SALImages", "data.long_side": [448, 768], "data.crop_size": 448,
    "data.hflip": True, "data.jitter": [0.3, 0.3, 0.3, 0.1],
    "model.method": "ppc", "model.backbone": "resnet38", "model.output_stride": 8,
    "model.weights": "data/weights/ilsvrc-cls_rna-a1_cls1000_ep-0001.params",
    "model.resnet38.width": 1.0, "model.resnet38.freeze_bn": True, "model.resnet38.freeze_stem": True,
    "model.eps.tau": 0.4, "model.eps.alpha": 0.5,
    "model.ppc.view_size": 128, "model.ppc.proj_dim": 128, "model.ppc.temperature": 0.1,
    "model.ppc.contrast_weight": 0.1, "model.ppc.bg_score": 0.1, "model.ppc.prototype_divisor": 16,
    "model.ppc.ecr_fraction": 0.2, "model.ppc.min_pool_fraction": 0.25, "model.ppc.pcm_dims": [64, 128],
    "optim.name": "sgd", "optim.lr": 0.01, "optim.weight_decay": 5e-4,
    "optim.momentum": 5e-4,  # wseg esp util/torchutils.py:7 SGD(params, lr, weight_decay) (issue 29)
    "optim.schedule": "poly", "optim.poly_power": 0.9, "optim.new_layer_lr_mult": 10.0,
    "train.epochs": 30, "train.batch_size": 8,
    "infer.split": "train", "infer.scales": [0.5, 1.0, 1.5, 2.0], "infer.flip": True, "eval.threshold": 0.22,
    "fsae.enabled": False,
}
COCO = {
    **VOC, "data.kind": "coco", "data.num_classes": 80, "data.train_split": "train2014", "data.val_split": "val2014",
    "data.mask_dir": "SegmentationClass", "data.saliency_dir": "SALImages", "data.long_side": [256, 448],
    "data.crop_size": 321, "model.eps.alpha": 0.9, "train.epochs": 50, "train.batch_size": 16,
    "infer.split": "train2014", "eval.threshold": 0.2,
}
FSAE_ON = {"fsae.enabled": True, "fsae.weight": 1.0, "fsae.tau_fae": 0.95, "fsae.tau_sae": 0.8,
           "fsae.kernel_size": 3, "fsae.use_sae": True, "fsae.strong_ops": 3}
RECIPES = {
    "voc/ppc_eps.yaml": VOC,
    "voc/ppc_eps_fsae.yaml": {**VOC, **FSAE_ON, "fsae.teacher": "reuse"},
    "coco/ppc_eps.yaml": COCO,
    "coco/ppc_eps_fsae.yaml": {**COCO, **FSAE_ON, "fsae.teacher": "ema", "fsae.ema_decay": 0.999},
}


@pytest.mark.parametrize("recipe", sorted(RECIPES))
def test_recipe_fields(recipe):
    cfg = load_config(REPO / "configs" / recipe)
    for key, want in RECIPES[recipe].items():
        value = cfg
        for part in key.split("."):
            value = getattr(value, part)
        assert value == want, f"{recipe}: {key} = {value!r}, expected {want!r}"
    # The +FSAE recipe differs from its base in fsae.* and the name only.
    if recipe.endswith("_fsae.yaml"):
        base = load_config(REPO / "configs" / recipe.replace("_fsae", "")).to_dict()
        this = cfg.to_dict()
        assert {k for k in this if this[k] != base[k]} == {"name", "fsae"}
    # 40k iterations (VOC) and EPS's 256,500 (COCO): epochs x (train images // batch)
    images = {"voc": 10582, "coco": 82081}[recipe.split("/")[0]]
    steps = cfg.train.epochs * (images // cfg.train.batch_size)
    assert steps == {"voc": 39660, "coco": 256500}[recipe.split("/")[0]]


# --- training end to end -----------------------------------------------------------------------------------

def tiny_ppc_config(root, fsae=False, teacher="reuse"):
    cfg = load_config(REPO / "configs/synthetic/ppc_eps_fsae.yaml" if fsae else REPO / "configs/synthetic/ppc_eps.yaml")
    cfg.data.root = str(root)
    cfg.data.saliency_dir = str(root / "saliency")
    cfg.data.long_side = None
    cfg.data.crop_size = 64
    cfg.model.width = 8
    cfg.model.ppc.view_size = 32
    cfg.train.epochs = 2
    cfg.train.batch_size = 8
    cfg.train.log_every = 1
    cfg.train.val_every = 0
    cfg.train.tensorboard = False
    cfg.fsae.start_epoch = 0
    cfg.fsae.teacher = teacher
    cfg.infer.scales = [1.0]
    return cfg


def test_training_logs_every_term_and_needs_saliency(tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    cfg = tiny_ppc_config(root, fsae=True, teacher="ema")
    ckpt = train(cfg, tmp_path / "run", progress=False)
    state = torch.load(ckpt, weights_only=True)
    assert "ema" in state  # the EMA teacher is saved with the model
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(__import__("csv").DictReader(f))
    assert len(rows) == 6
    for row in rows:
        terms = [float(row[k]) for k in ("cls", "sal", "er", "ecr", "contrast", "fsae")]
        assert all(math.isfinite(v) for v in terms)
        assert float(row["loss"]) == pytest.approx(sum(terms), rel=1e-4)
    cfg.data.saliency_dir = None
    with pytest.raises(ConfigError, match="saliency_dir"):
        train(cfg, tmp_path / "run2", progress=False)


@pytest.mark.slow
def test_ppc_trains_on_the_generated_set_and_cam_eval_run(tmp_path):
    """A few hundred steps: no NaN, the loss falls; `fsae cam` / `fsae eval` run on the checkpoint."""
    from fsae.data.synthetic import SyntheticSpec, generate

    # a strong body grating (as conftest's tiny set): a set a tiny network learns in 200 steps
    spec = SyntheticSpec(num_train=64, num_val=16, image_size=64, body_axes=(10.0, 16.0), part_radius=(2.5, 3.5),
                         stripe_period=(6.0, 9.0), stripe_amplitude=(0.12, 0.2), seed=4)
    root = generate(tmp_path / "data", spec, progress=False)
    cfg = tiny_ppc_config(root)
    cfg.train.epochs = 25  # 200 steps of batch 8
    cfg.train.log_every = 8
    run = tmp_path / "run"
    train(cfg, run, progress=False)
    losses = [float(r["loss"]) for r in assert_finished_without_nan(run, cfg, spec.num_train)]  # 25 rows
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])
    assert cli(["cam", str(run)]) == 0
    out_json = tmp_path / "eval.json"
    assert cli(["eval", "--seeds", str(run / "seeds"), "--gt", str(root / "SegmentationClass"),
                "--num-classes", "4", "--sweep", "0", "0.6", "0.05", "--out", str(out_json)]) == 0
    result = json.loads(out_json.read_text())
    assert result["count"] == 64 and result["best"]["miou"] > 0.3
    keys, cams = load_seed(sorted((run / "seeds").glob("*.npz"))[0])
    assert cams.max() <= 1.0 and cams.shape[1:] == (64, 64)


@pytest.mark.slow
def test_reduced_resnet38_ppc_trains_without_nan(tiny_synthetic, tmp_path):
    root, _ = tiny_synthetic
    cfg = tiny_ppc_config(root, fsae=True)
    cfg.model.backbone = "resnet38"
    cfg.model.resnet38.width = 0.0625
    cfg.model.resnet38.freeze_bn = False
    cfg.model.resnet38.freeze_stem = False
    cfg.optim.name, cfg.optim.lr, cfg.optim.new_layer_lr_mult = "sgd", 0.01, 10.0
    train(cfg, tmp_path / "run", progress=False)
    rows = assert_finished_without_nan(tmp_path / "run", cfg, 24)  # 6 rows: 2 epochs of 24 // 8 steps
    assert all(math.isfinite(float(r["fsae"])) for r in rows) and any(float(r["fsae"]) > 0 for r in rows)


def test_a_nan_in_the_ppc_loss_stops_training(tiny_synthetic, tmp_path, nan_at_call):
    """What the finite-loss checks above rely on: a NaN step stops the run before its row is written."""
    root, _ = tiny_synthetic
    nan_at_call(PPC, 1)
    assert_nan_stops_training(train, tiny_ppc_config(root, fsae=True), tmp_path / "run")


@pytest.mark.parametrize("dataset", ["voc", "coco"])
def test_authors_fsae_recipe_short_run(tiny_synthetic, tmp_path, dataset):
    """configs/<dataset>/ppc_eps_fsae_authors.yaml on the generated set with CPU-sized overrides: it
    differs from the paper's recipe in the fsae section and (COCO) the schedule (the momentum is the same since issue 29),
    and it trains with its FSAE term."""
    root, _ = tiny_synthetic
    authors = load_config(REPO / f"configs/{dataset}/ppc_eps_fsae_authors.yaml")
    paper = load_config(REPO / f"configs/{dataset}/ppc_eps_fsae.yaml")
    for section in ("data", "model", "infer", "eval"):
        assert getattr(authors, section) == getattr(paper, section), section
    assert (authors.optim.momentum, paper.optim.momentum) == (5e-4, 5e-4)  # PolyOptimizer's momentum slot (issue 29)
    assert (authors.train.epochs, paper.train.epochs) == ((200, 50) if dataset == "coco" else (30, 30))
    fs = authors.fsae
    teacher = "ema" if dataset == "coco" else "separate"  # script/coco_ppc1.sh --use_ema
    assert (fs.strong_ops, fs.strong_replacement, fs.enhance_range, fs.posterize_bits, fs.blur_kernel,
            fs.strong_source, fs.loss_form, fs.mask_padding, fs.teacher) == \
        (5, True, [0.05, 0.95], [4, 7], "per_run", "original", "two_term", False, teacher)
    if dataset == "coco":
        return  # the same fsae section: one run is enough
    cfg = tiny_ppc_config(root, fsae=True, teacher="separate")
    cfg.fsae = fs
    cfg.fsae.start_epoch = 0
    train(cfg, tmp_path / "run", progress=False)
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = list(__import__("csv").DictReader(f))
    assert rows and all(math.isfinite(float(r["loss"])) for r in rows)
    assert any(float(r["fsae"]) > 0 for r in rows)
