"""Parity of the steps after training with each base method's own repository (issue 16, issue 22 section 2).

Every test restates the upstream behaviour in plain code (written from reading the upstream file cited
next to it, not copied) and compares fsae's default for that method against it on small inputs.
"""

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fsae.config import load_config, save_config
from fsae.evaluate import evaluate_seeds, load_seed, pick_best
from fsae.infer import infer_seeds, normalise_seed, save_seed, scaled_batch, upsample_cam
from fsae.io import write_image, write_mask
from fsae.protocol import PROTOCOLS, resolve_protocol

REPO = Path(__file__).resolve().parents[1]
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def ref_pil_rescale(img, scale):
    # IRN misc/imutils.py:8-22 (and SIPE tool/imutils.py:19-22): PIL bicubic on the uint8 image, round(H*s).
    h, w = img.shape[:2]
    size = (int(np.round(h * scale)), int(np.round(w * scale)))
    if size == (h, w):
        return img
    return np.asarray(Image.fromarray(img).resize((size[1], size[0]), Image.BICUBIC))


def ref_normalise(img):
    # IRN voc12/dataloader.py:65-78 TorchvisionNormalize, then HWC_to_CHW.
    out = np.empty(img.shape, np.float32)
    for c in range(3):
        out[..., c] = (img[..., c] / 255.0 - MEAN[c]) / STD[c]
    return out.transpose(2, 0, 1)


def random_image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ------------------------------------------------------------------------ 1. IRN / plain CAM inference


def test_irn_rescale_is_pil_bicubic_of_the_uint8_image_to_round_h_s():
    img = random_image(37, 45)
    for scale in (0.5, 1.5, 0.7):
        expected = ref_pil_rescale(img, scale)
        got = scaled_batch(torch.from_numpy(img)[None], scale, PROTOCOLS["cam"].resize)[0]
        assert tuple(got.shape[-2:]) == expected.shape[:2]  # 37 * 0.7 = 25.9 -> 26 (floor would give 25)
        np.testing.assert_allclose(got.numpy(), ref_normalise(expected), atol=1e-5)


def test_irn_cam_upsampling_is_strided_up_size_then_crop():
    cams = torch.rand(1, 2, 3, 4, generator=torch.Generator().manual_seed(0))
    h, w = 37, 45
    # IRN misc/imutils.py:173-179 and step/make_cam.py:33,42-44: up to ((h-1)//16+1)*16, then [:h, :w].
    up = (((h - 1) // 16 + 1) * 16, ((w - 1) // 16 + 1) * 16)
    expected = F.interpolate(cams, up, mode="bilinear", align_corners=False)[..., :h, :w]
    p = PROTOCOLS["cam"]
    got = upsample_cam(cams, (h, w), p.upsample, p.upsample_stride)
    torch.testing.assert_close(got, expected)
    assert (got - F.interpolate(cams, (h, w), mode="bilinear", align_corners=False)).abs().max() > 1e-3


class StrideNet(torch.nn.Module):
    """A tiny CAM network: ``cam(x)`` = a 1x1 conv after 4x4 average pooling (C = 3)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 1)

    def cam(self, x):
        return self.conv(F.avg_pool2d(x, 4, ceil_mode=True))


@torch.no_grad()
def ref_irn_make_cam(net, img, label, scales):
    """IRN step/make_cam.py:32-52 with voc12/dataloader.py:185-205 and net/resnet50_cam.py:66-68."""
    size = img.shape[:2]
    strided_size = ((size[0] - 1) // 4 + 1, (size[1] - 1) // 4 + 1)
    up_size = (((size[0] - 1) // 16 + 1) * 16, ((size[1] - 1) // 16 + 1) * 16)
    outputs = []
    for s in scales:
        x = torch.from_numpy(ref_normalise(ref_pil_rescale(img, s) if s != 1 else img))
        pair = torch.stack([x, x.flip(-1)])
        o = F.relu(net.cam(pair))
        outputs.append(o[0] + o[1].flip(-1))
    strided = sum(F.interpolate(o[None], strided_size, mode="bilinear", align_corners=False)[0] for o in outputs)
    high = sum(F.interpolate(o[:, None], up_size, mode="bilinear", align_corners=False) for o in outputs)
    high = high[:, 0, :size[0], :size[1]]
    valid = torch.nonzero(torch.as_tensor(label))[:, 0]
    strided, high = strided[valid], high[valid]
    strided = strided / (F.adaptive_max_pool2d(strided, (1, 1)) + 1e-5)
    high = high / (F.adaptive_max_pool2d(high, (1, 1)) + 1e-5)
    return valid.numpy() + 1, high.numpy(), strided.numpy()


class OneImage:
    def __init__(self, img, label):
        self.ids = ["a"]
        self.sample = {"id": "a", "image": img, "label": np.asarray(label, np.float32)}

    def __len__(self):
        return 1

    def __getitem__(self, i):
        return self.sample


def test_irn_seed_and_stride4_walk_start_match_make_cam(tmp_path):
    img, label, scales = random_image(37, 45, seed=1), [1.0, 0.0, 1.0], (1.0, 0.5, 1.5)
    net = StrideNet()
    keys, high, strided = ref_irn_make_cam(net, img, label, scales)
    cfg = load_config(REPO / "configs/voc/cam.yaml")
    infer_seeds(net, OneImage(img, label), tmp_path, scales, True, 1, progress=False, protocol=resolve_protocol(cfg))
    with np.load(tmp_path / "a.npz") as seed:
        assert seed["keys"].tolist() == keys.tolist()
        np.testing.assert_allclose(seed["cams"].astype(np.float32), high, atol=2e-3)  # float16 storage
        np.testing.assert_allclose(seed["strided"].astype(np.float32), strided, atol=2e-3)
    from fsae.refine.irn.walk import irn_start_cams, load_strided

    start = irn_start_cams(torch.from_numpy(high), torch.from_numpy(load_strided(tmp_path / "a.npz")), strided.shape[1:])
    np.testing.assert_allclose(start.numpy(), strided, atol=2e-3)


def test_irn_training_crop_smaller_than_the_crop_sits_at_a_random_place(tmp_path):
    from fsae.refine.irn.train import AffinityCrops

    img = random_image(20, 40, seed=2)
    label = np.random.default_rng(3).integers(0, 3, (20, 40)).astype(np.uint8)
    write_image(tmp_path / "im" / "a.png", img)
    write_mask(tmp_path / "lb" / "a.png", label)
    crop, tops = 32, []
    for seed in range(6):
        # IRN voc12/dataloader.py:227-273 with misc/imutils.py:36-101 (scale, flip, random_crop, reduce x0.25)
        random.seed(seed)
        scale = 1.0 + random.random() * 0.0
        im, lb = ref_pil_rescale(img, scale), label
        x = ref_normalise(im).transpose(1, 2, 0)
        if bool(random.getrandbits(1)):
            x, lb = np.fliplr(x), np.fliplr(lb)
        h, w = lb.shape
        w_space, h_space = w - crop, h - crop
        if w_space > 0:
            cont_left, img_left = 0, random.randrange(w_space + 1)
        else:
            cont_left, img_left = random.randrange(-w_space + 1), 0
        if h_space > 0:
            cont_top, img_top = 0, random.randrange(h_space + 1)
        else:
            cont_top, img_top = random.randrange(-h_space + 1), 0
        ch, cw = min(crop, h), min(crop, w)
        cx = np.zeros((crop, crop, 3), np.float32)
        cy = np.full((crop, crop), 255, np.uint8)
        cx[cont_top:cont_top + ch, cont_left:cont_left + cw] = x[img_top:img_top + ch, img_left:img_left + cw]
        cy[cont_top:cont_top + ch, cont_left:cont_left + cw] = lb[img_top:img_top + ch, img_left:img_left + cw]
        reduced = np.asarray(Image.fromarray(cy).resize((crop // 4, crop // 4), Image.NEAREST))
        random.seed(seed)
        sample = AffinityCrops(tmp_path / "im", tmp_path / "lb", ["a"], crop, (1.0, 1.0), True, ".png")[0]
        np.testing.assert_allclose(sample["image"].numpy(), cx.transpose(2, 0, 1), atol=1e-5)
        assert sample["label"].numpy().tolist() == reduced.tolist()
        tops.append(cont_top)
    assert max(tops) > 0  # the 20-px side is not always at the top of the 32-px crop


# --------------------------------------------------------------------------------------------- 2. SIPE


def tiny_sipe():
    from fsae.methods.sipe import SIPE

    torch.manual_seed(0)
    return SIPE(3, "resnet18", None, side_channels=(4, 4, 8, 8), channels=(8, 16, 16, 32), freeze_bn=False,
                freeze_low_stages=False).eval()


def test_sipe_gsc_gradient_flows_through_the_is_cam_max():
    from fsae.methods.sipe import gsc_loss

    gen = torch.Generator().manual_seed(0)
    norm_cam = torch.rand(2, 4, 5, 5, generator=gen)
    a = torch.rand(2, 4, 5, 5, generator=gen, requires_grad=True)
    b = a.detach().clone().requires_grad_(True)
    # SIPE train_resnet50_SIPE.py:151-152: IS_cam / (max + 1e-5), the max NOT detached, mean |.|.
    torch.mean(torch.abs(norm_cam - b / (F.adaptive_max_pool2d(b, (1, 1)) + 1e-5))).backward()
    gsc_loss(norm_cam, a).backward()
    torch.testing.assert_close(a.grad, b.grad)


def test_sipe_inference_seeds_are_gated_after_the_argmax_and_cam_returns_c_channels():
    model = tiny_sipe()
    torch.manual_seed(1)
    x = torch.randn(1, 3, 64, 64)
    label = torch.tensor([1.0, 0.0, 0.0])  # one present class: absent ones would win pixels if gated before
    fg, bg = model.cam_with_background(x, label[None])
    assert fg.shape == (1, 3, 4, 4) and bg.shape == (1, 4, 4)
    assert model.cam(x, label[None]).shape == (1, 3, 4, 4)  # C channels, like every method
    with torch.no_grad():
        hie = model._trunk(x)[1]  # the hierarchical features (sides of every stage; tested in test_sipe.py)
    ref = ref_sipe_is_cam(model, x, label, hie)
    torch.testing.assert_close(bg[0], ref[0, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(fg[0], ref[0, 1:] * label[:, None, None], atol=1e-5, rtol=0)


def ref_sipe_is_cam(model, x, label, hie):
    """SIPE network/resnet50_SIPE.py:32-64,139-154 (one view, no flip fusion), background FIRST: the seed
    correlation on the hierarchical features ``hie`` (line 149), the map not label-gated."""
    with torch.no_grad():
        x4 = model.features(x)[3]
        cam = model.classifier(x4)
        norm_cam = F.relu(cam)
        norm_cam = norm_cam / (F.adaptive_max_pool2d(norm_cam, (1, 1)) + 1e-5)
        norm_cam = torch.cat([1 - torch.max(norm_cam, dim=1)[0].unsqueeze(1), norm_cam], 1)  # not gated
        norm_cam = F.interpolate(norm_cam, hie.shape[2:], mode="bilinear", align_corners=True)
        n, c, h, w = norm_cam.shape
        fs = hie.reshape(n, -1, h * w)
        fs = fs / (torch.norm(fs, dim=1, keepdim=True) + 1e-5)
        corr = F.relu(torch.matmul(fs.transpose(2, 1), fs)).unsqueeze(1)
        flat = norm_cam.view(n, -1, h * w).unsqueeze(2)
        inter = (corr * flat).sum(-1)
        union = corr.sum(-1) + flat.sum(-1) - inter
        miou = (inter / union).view(n, c, h, w)
        miou[:, 0] = miou[:, 0] * 0.5
        seeds = F.one_hot(miou.argmax(1), c).permute(0, 3, 1, 2).float()
        seeds = seeds * torch.cat([torch.ones(1), label])[None, :, None, None]  # gated AFTER the argmax
        proto = (seeds.unsqueeze(2) * hie.unsqueeze(1)).mean((3, 4))[..., None, None]
        return F.relu(torch.cosine_similarity(hie.unsqueeze(1), proto, dim=2))


# ----------------------------------------------------------------------------- SIPE's IRN (issue 22.2)


def ref_crf_inference_label(img, labels, n_labels, t=10, gt_prob=0.7):
    # IRN / SIPE misc/imutils.py:156-170.
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_labels

    h, w = img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(unary_from_labels(labels, n_labels, gt_prob=gt_prob, zero_unsure=False))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=50, srgb=5, rgbim=np.ascontiguousarray(np.copy(img)), compat=10)
    return np.argmax(np.array(d.inference(t)).reshape((n_labels, h, w)), axis=0)


def test_sipe_cam2ir_uses_its_background_plane_halved_for_the_confident_background():
    pytest.importorskip("pydensecrf.densecrf")
    from fsae.refine.irn.ir_labels import ir_label

    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (12, 16, 3), dtype=np.uint8)
    keys = np.array([2, 5])
    cams = rng.random((2, 12, 16)).astype(np.float32)
    background = rng.random((12, 16)).astype(np.float32)
    # SIPE cam2ir.py:21-40: IS_CAM = [bg, fg...], keys with 0 first; fg_conf on the plain argmax,
    # bg_conf with the background plane times 0.5.
    is_cam = np.concatenate([background[None], cams])
    ref_keys = np.concatenate([[0], keys])
    fg_conf = ref_keys[ref_crf_inference_label(img, np.argmax(is_cam, 0), 3)]
    halved = is_cam.copy()
    halved[0] = halved[0] * 0.5
    bg_conf = ref_keys[ref_crf_inference_label(img, np.argmax(halved, 0), 3)]
    conf = fg_conf.copy()
    conf[fg_conf == 0] = 255
    conf[bg_conf + fg_conf == 0] = 0
    got = ir_label(img, keys, cams, background=background)
    assert got.tolist() == conf.astype(np.uint8).tolist()
    assert (got == 255).any() and (got == 0).any()


def test_sipe_walk_runs_on_is_cam_power_1_5_with_its_background_and_takes_the_plain_argmax():
    from fsae.refine.irn.walk import propagate, sipe_start_cams, walk_to_mask

    gen = torch.Generator().manual_seed(5)
    cams, background = torch.rand(2, 18, 22, generator=gen), torch.rand(18, 22, generator=gen)
    edge = torch.rand(5, 6, generator=gen) * 0.5
    keys = np.array([3, 7])
    # SIPE make_seg_labels.py:43-54: IS_CAM (bg first) bilinear to the edge grid, ** 1.5, walk, x4 up,
    # crop, / max, argmax, keys (with 0 first).
    is_cam = torch.cat([background[None], cams])
    start = F.interpolate(is_cam[:, None], (5, 6), mode="bilinear", align_corners=False)[:, 0].pow(1.5)
    rw = propagate(start, edge)
    up = F.interpolate(rw[:, None], scale_factor=4, mode="bilinear", align_corners=False)[:, 0, :18, :22]
    pred = np.concatenate([[0], keys])[torch.argmax(up / up.max(), 0).numpy()]
    got_start = sipe_start_cams(cams, background, (5, 6))
    torch.testing.assert_close(got_start, start)
    got = walk_to_mask(propagate(got_start, edge), keys, (18, 22), 0.25, 4, own_background=True)
    assert got.tolist() == pred.astype(np.uint8).tolist()


# ------------------------------------------------------------------------------------ 3. MCTformer V2


def test_mctformer_seeds_are_min_max_normalised():
    gen = torch.Generator().manual_seed(6)
    cam = torch.rand(3, 6, 7, generator=gen) + 0.3
    label = torch.tensor([1.0, 0.0, 1.0])
    keys, got = normalise_seed(cam, label, resolve_protocol(load_config(REPO / "configs/voc/mctformer.yaml")).normalise)
    assert keys.tolist() == [1, 3]
    for i, c in enumerate((0, 2)):
        a = cam[c]
        ref = (a - a.min()) / (a.max() - a.min() + 1e-8)  # MCTformer engine.py:198
        np.testing.assert_allclose(got[i], ref.numpy(), atol=1e-6)
    assert got.min() == pytest.approx(0.0, abs=1e-7)


# ------------------------------------------------------------------------------------------ 4. PPC/EPS


def test_ppc_crf_background_is_one_minus_max_to_the_alpha_with_five_iterations():
    pytest.importorskip("pydensecrf.densecrf")
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    from fsae.refine.crf import refine_seed

    rng = np.random.default_rng(7)
    img = rng.integers(0, 256, (14, 18, 3), dtype=np.uint8)
    keys = np.array([1, 4])
    cams = rng.random((2, 14, 18)).astype(np.float32)
    p = resolve_protocol(load_config(REPO / "configs/voc/ppc_eps.yaml"))
    assert (p.background, p.bg_power, p.crf_iterations, p.threshold) == ("power", 8.0, 5, 0.22)
    # usr922/wseg esp contrast_infer.py:154-163 and util/imutils.py:155-172 (t = 5, alpha = 8).
    bg = np.power(1 - np.max(cams, axis=0, keepdims=True), 8)
    score = np.concatenate([bg, cams], 0)
    d = dcrf.DenseCRF2D(18, 14, 3)
    d.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(score)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.copy(img), compat=10)
    q = np.array(d.inference(5)).reshape(3, 14, 18)
    expected = np.concatenate([[0], keys])[np.argmax(q, 0)]
    got = refine_seed(img, keys, cams, p.threshold, p.background, p.bg_power, iterations=p.crf_iterations)
    assert got.tolist() == expected.astype(np.uint8).tolist()


def test_recipe_threshold_is_read_by_fsae_crf(tmp_path):
    pytest.importorskip("pydensecrf.densecrf")
    from fsae.cli import main as cli
    from fsae.io import read_image, read_mask
    from fsae.refine.crf import refine_seed

    cfg = load_config(REPO / "configs/voc/ppc_eps.yaml")
    cfg.data.root = str(tmp_path / "data")
    cfg.eval.background = "threshold"  # the threshold form, to see the recipe's 0.22 used
    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    rng = np.random.default_rng(8)
    write_image(tmp_path / "data" / "JPEGImages" / "a.jpg", rng.integers(0, 256, (10, 12, 3), dtype=np.uint8))
    img = read_image(tmp_path / "data" / "JPEGImages" / "a.jpg")
    cams = np.clip(np.linspace(0.0, 0.44, 120).reshape(1, 10, 12), 0, 1).astype(np.float32)
    save_seed(run / "seeds" / "a.npz", np.array([3]), cams)
    assert cli(["crf", str(run), "--workers", "1"]) == 0
    cams = load_seed(run / "seeds" / "a.npz")[1]
    expected = refine_seed(img, np.array([3]), cams, 0.22, iterations=5)
    assert read_mask(run / "crf" / "a.png").tolist() == expected.tolist()
    assert expected.tolist() != refine_seed(img, np.array([3]), cams, 0.25, iterations=5).tolist()


# ------------------------------------------------------------------------------------ 5. Evaluation


def test_mctformer_sweep_stops_at_the_first_drop():
    miou = [0.40, 0.45, 0.47, 0.46, 0.50, 0.30]
    # MCTformer evaluation.py:137-148: best-so-far, break at the first value not above it.
    best, top = 0.0, 0.0
    for i, v in enumerate(miou):
        if v > top:
            top, best = v, i
        else:
            break
    assert pick_best(miou, "first_drop") == best == 2
    assert pick_best(miou, "sweep") == 4


def test_protocol_thresholds_of_each_repo():
    assert PROTOCOLS["cam"].thresholds() == [0.15]  # IRN run_sample.py:30 cam_eval_thres
    # obeychoi0120/wseg@ssl eval.py:155-156 (i / 100, i < --max_th) with script/voc_ppc1.sh:86 --max_th 50
    assert PROTOCOLS["ppc"].thresholds() == [i / 100 for i in range(50)]
    assert PROTOCOLS["mctformer"].thresholds() == [i / 100 for i in range(60)]  # MCTformer evaluation.py:139-140
    assert PROTOCOLS["mctformer"].eval_mode == "first_drop" and PROTOCOLS["sipe"].eval_mode == "argmax"
    assert all(p.eval_split == "train" for p in PROTOCOLS.values())


def test_fsae_eval_scores_the_recipe_threshold_on_the_train_ids_only(tiny_synthetic, tmp_path):
    from fsae.cli import main as cli
    from fsae.data import build_dataset

    root, spec = tiny_synthetic
    cfg = load_config(REPO / "configs/synthetic/cam.yaml")
    cfg.data.root = str(root)
    cfg.eval.threshold = 0.4
    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    train_ids = build_dataset(cfg.data, "train").ids
    val_ids = build_dataset(cfg.data, "val").ids
    rng = np.random.default_rng(9)
    for image_id in list(train_ids) + list(val_ids):  # seeds/ also holds other ids (train_aug in VOC)
        save_seed(run / "seeds" / f"{image_id}.npz", np.array([1]),
                  rng.random((1, spec.image_size, spec.image_size)).astype(np.float32))
    out = tmp_path / "e.json"
    assert cli(["eval", "--seeds", str(run / "seeds"), "--gt", str(root / "SegmentationClass"),
                "--num-classes", str(spec.num_classes), "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    expected = evaluate_seeds(run / "seeds", root / "SegmentationClass", train_ids, spec.num_classes, [0.4],
                              progress=False, mode="fixed")
    assert result["count"] == len(train_ids) and result["thresholds"] == [0.4]
    assert result["best"]["miou"] == pytest.approx(expected["best"]["miou"], abs=1e-12)


def test_report_and_compare_score_the_protocol_split_at_the_protocol_threshold(tiny_synthetic, tmp_path):
    from fsae.data import build_dataset
    from fsae.rundir import run_dataset, update_evals

    root, spec = tiny_synthetic
    cfg = load_config(REPO / "configs/synthetic/cam.yaml")
    cfg.data.root = str(root)
    run = tmp_path / "run"
    save_config(cfg, run / "config.yaml")
    train_ids, val_ids = build_dataset(cfg.data, "train").ids, build_dataset(cfg.data, "val").ids
    rng = np.random.default_rng(10)
    for image_id in list(train_ids) + list(val_ids):
        save_seed(run / "seeds" / f"{image_id}.npz", np.array([2]),
                  rng.random((1, spec.image_size, spec.image_size)).astype(np.float32))
    update_evals(run, cfg, run_dataset(cfg))
    result = json.loads(next((run / "eval").glob("*.json")).read_text())
    assert result["count"] == len(train_ids) and result["thresholds"] == [0.15]  # IRN's cam_eval_thres
