"""PSA AffinityNet: the affinity labels (two background powers + CRF, the label map, the pair labels), the
affinity and its loss, and the random walk against plainly written references of PSA's code
(github.com/jiwoon-ahn/psa; file:line cited); the recipes; AffinityNet training killed by SIGKILL and
resumed; the `fsae psa` stage end to end on a tiny generated set."""

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

dcrf = pytest.importorskip("pydensecrf.densecrf", reason="PSA's affinity labels need `pip install pydensecrf2==1.1`")
pytest.importorskip("torchvision")

from fsae.cli import main as cli
from fsae.data.synthetic import SyntheticSpec, generate
from fsae.errors import ConfigError
from fsae.infer import save_seed
from fsae.io import read_mask, write_json, write_mask
from fsae.refine.affinity import affinity_loss, pair_set
from fsae.refine.psa.aff_labels import aff_label_scores, affinity_label_map, crf_with_alpha
from fsae.refine.psa.affinity import pair_affinity, pair_window, psa_affinity_labels
from fsae.refine.psa.config import PSAWalkConfig, load_psa_config
from fsae.refine.psa.network import AffinityNet
from fsae.refine.psa.train import AffinityCrops, pool, train_step
from fsae.refine.psa.walk import propagate, psa_mask, walk_scores
from fsae.stamps import folder_digest, make_stamp, read_stamp, stamp_path
from tests.conftest import run_fsae

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ plainly written PSA references


def psa_search_dist(radius):
    """voc12/data.py:128-136 (and tool/pyutils.py:127-135)."""
    dist = [(0, x) for x in range(1, radius)]
    for y in range(1, radius):
        for x in range(-radius + 1, radius):
            if x * x + y * y < radius * radius:
                dist.append((y, x))
    return dist


def psa_indices_of_pairs(radius, size):
    """tool/pyutils.py:125-159: ``ind_from`` (M,) and ``ind_to`` (D * M,) over the row-major grid."""
    rf = radius - 1
    full = np.arange(size[0] * size[1]).reshape(size)
    ch, cw = size[0] - rf, size[1] - 2 * rf
    ind_from = full[:-rf, rf:-rf].reshape(-1)
    ind_to = np.concatenate([full[dy:dy + ch, rf + dx:rf + dx + cw].reshape(-1) for dy, dx in psa_search_dist(radius)])
    return ind_from, ind_to


def psa_extract_affinity_labels(label, radius):
    """voc12/data.py:144-173 (ExtractAffinityLabelInRadius.__call__): three (D, M) float arrays."""
    rf = radius - 1
    ch, cw = label.shape[0] - rf, label.shape[1] - 2 * rf
    labels_from = label[:-rf, rf:-rf].reshape(-1)
    to_list, valid_list = [], []
    for dy, dx in psa_search_dist(radius):
        labels_to = label[dy:dy + ch, rf + dx:rf + dx + cw].reshape(-1)
        to_list.append(labels_to)
        valid_list.append(np.logical_and(labels_to < 255, labels_from < 255))
    bc_from, to, valid = labels_from[None], np.stack(to_list), np.stack(valid_list)
    pos = bc_from == to
    bg = np.logical_and(pos, bc_from == 0).astype(np.float32)
    fg = np.logical_and(np.logical_and(pos, bc_from != 0), valid).astype(np.float32)
    neg = np.logical_and(np.logical_not(pos), valid).astype(np.float32)
    return bg, fg, neg


def psa_affinity(features, radius):
    """network/resnet38_aff.py:43-58: (B, D, M) affinities of the index pairs."""
    b, c, h, w = features.shape
    ind_from, ind_to = (torch.from_numpy(i) for i in psa_indices_of_pairs(radius, (h, w)))
    x = features.reshape(b, c, -1)
    ff = torch.index_select(x, 2, ind_from).unsqueeze(2)
    ft = torch.index_select(x, 2, ind_to).view(b, c, -1, ff.size(3))
    return torch.exp(-torch.mean(torch.abs(ft - ff), dim=1))


def psa_dense_affinity(features, radius):
    """network/resnet38_aff.py:60-73 (forward with to_dense=True) for one image."""
    _, _, h, w = features.shape
    ind_from, ind_to = (torch.from_numpy(i) for i in psa_indices_of_pairs(radius, (h, w)))
    aff = psa_affinity(features, radius).reshape(-1)
    ind_from_exp = ind_from.unsqueeze(0).expand(len(psa_search_dist(radius)), -1).reshape(-1)
    area = h * w
    indices = torch.cat([torch.stack([ind_from_exp, ind_to]), torch.stack([torch.arange(area)] * 2),
                         torch.stack([ind_to, ind_from_exp])], dim=1)
    dense = torch.zeros(area, area)  # sparse.FloatTensor(...).to_dense(): duplicates would be summed
    return dense.index_put_((indices[0], indices[1]), torch.cat([aff, torch.ones(area), aff]), accumulate=True)


def psa_loss(aff, bg_label, fg_label, neg_label):
    """train_aff.py:105-113."""
    bg_count, fg_count, neg_count = bg_label.sum() + 1e-5, fg_label.sum() + 1e-5, neg_label.sum() + 1e-5
    bg_loss = torch.sum(-bg_label * torch.log(aff + 1e-5)) / bg_count
    fg_loss = torch.sum(-fg_label * torch.log(aff + 1e-5)) / fg_count
    neg_loss = torch.sum(-neg_label * torch.log(1.0 + 1e-5 - aff)) / neg_count
    return bg_loss / 4 + fg_loss / 4 + neg_loss / 2


def psa_walk(cam_full_arr, features, beta, logt, radius):
    """infer_aff.py:85-120 from the background-filled score array (K+1, H, W) to the argmax (H, W), and the
    upsampled walk."""
    k1, height, width = cam_full_arr.shape
    padded_size = (int(np.ceil(height / 8) * 8), int(np.ceil(width / 8) * 8))
    dheight, dwidth = padded_size[0] // 8, padded_size[1] // 8
    arr = np.pad(cam_full_arr, ((0, 0), (0, padded_size[0] - height), (0, padded_size[1] - width)), mode="constant")
    aff_mat = torch.pow(psa_dense_affinity(features, radius), beta)
    trans_mat = aff_mat / torch.sum(aff_mat, dim=0, keepdim=True)
    for _ in range(logt):
        trans_mat = torch.matmul(trans_mat, trans_mat)
    arr = F.avg_pool2d(torch.from_numpy(arr), 8, 8)
    cam_rw = torch.matmul(arr.view(k1, -1), trans_mat).view(1, k1, dheight, dwidth)
    cam_rw = torch.nn.Upsample(padded_size, mode="bilinear", align_corners=False)(cam_rw)
    pred = torch.max(cam_rw, 1)[1][0, :height, :width].numpy()
    return pred, cam_rw[0]


def psa_crf(img, probs):
    """tool/imutils.py:200-217 (crf_inference, t=10, scale_factor=1) with pydensecrf's unary_from_softmax."""
    n_labels, (h, w) = probs.shape[0], img.shape[:2]
    d = dcrf.DenseCRF2D(w, h, n_labels)
    d.setUnaryEnergy(np.ascontiguousarray(-np.log(np.clip(probs, 1e-5, None)).reshape(n_labels, -1).astype(np.float32)))
    d.addPairwiseGaussian(sxy=3, compat=3)
    d.addPairwiseBilateral(sxy=80, srgb=13, rgbim=np.copy(img), compat=10)
    return np.array(d.inference(10)).reshape((n_labels, h, w))


def key_of_direction(radius):
    """Our pair axis -> PSA's search_dist position."""
    ours = [tuple(d) for d in pair_set(radius).directions]
    return [ours.index(d) for d in psa_search_dist(radius)]


def window_values(ours, radius):
    """Our (..., D, h, w) pair map -> PSA's (..., D, M) layout (window sources, PSA's direction order)."""
    rf = radius - 1
    return ours[..., key_of_direction(radius), :-rf, rf:-rf].flatten(-2)


# ------------------------------------------------------------------------------ affinity labels


def two_blob_seed(h=20, w=28, seed=0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    cams = np.zeros((2, h, w), np.float32)
    cams[0, 2:12, 3:14] = 0.9
    cams[1, 8:18, 15:26] = 0.7
    cams = np.clip(cams + rng.uniform(0, 0.3, cams.shape).astype(np.float32), 0, 1)
    return image, np.array([2, 5]), cams


@pytest.mark.parametrize("alpha", [4.0, 32.0, 1.0, 12.0])
def test_crf_with_alpha_matches_psa(alpha):
    image, _, cams = two_blob_seed()
    # infer_cls.py:90-94: bg = (1 - max)^alpha in front of the CAMs, then crf_inference on the raw scores
    bgcam = np.concatenate([np.power(1 - np.max(cams, axis=0, keepdims=True), alpha), cams])
    np.testing.assert_allclose(crf_with_alpha(image, cams, alpha), psa_crf(image, bgcam), atol=1e-6)


def test_aff_label_scores_low_power_is_the_stronger_background():
    image, keys, cams = two_blob_seed()
    la, ha = aff_label_scores(image, keys, cams, low_alpha=4, high_alpha=32)
    assert la.shape == ha.shape == (3, 20, 28)
    assert (la[0] >= ha[0] - 1e-6).mean() > 0.95  # (1 - m)^4 >= (1 - m)^32: more background at the low power
    empty_la, empty_ha = aff_label_scores(image, np.zeros(0, int), np.zeros((0, 20, 28), np.float32))
    assert (empty_la == 1).all() and (empty_ha == 1).all()


def psa_label_map(la, ha):
    """voc12/data.py:222-229 per pixel: local indices 0..K, 255 ignore."""
    out = np.zeros(la.shape[1:], np.int64)
    for y in range(la.shape[1]):
        for x in range(la.shape[2]):
            if max(la[:, y, x].max(), ha[:, y, x].max()) < 1e-5:
                out[y, x] = 255
            elif np.argmax(ha[:, y, x]) == 0:
                out[y, x] = 0
            elif np.argmax(la[:, y, x]) == 0:
                out[y, x] = 255
            else:
                out[y, x] = np.argmax(la[:, y, x])
    return out


def test_affinity_label_map_matches_psa():
    rng = np.random.default_rng(1)
    la, ha = rng.random((3, 9, 11)), rng.random((3, 9, 11))
    la[:, 0, :3] = ha[:, 0, :3] = 0  # padding: no score
    keys = np.array([3, 7])
    expected = np.array([0, 3, 7])[np.minimum(psa_label_map(la, ha), 2)]
    expected[psa_label_map(la, ha) == 255] = 255
    np.testing.assert_array_equal(affinity_label_map(la, ha, keys), expected)
    # by hand: la fg + ha fg -> the class; la bg + ha fg -> ignore; ha bg -> background whatever la says
    la1 = np.array([[[0.1, 0.8, 0.2]], [[0.9, 0.1, 0.8]]])
    ha1 = np.array([[[0.0, 0.1, 0.9]], [[1.0, 0.9, 0.1]]])
    np.testing.assert_array_equal(affinity_label_map(la1, ha1, np.array([4])), [[4, 255, 0]])


def write_label_pair(folder, la, ha, keys):
    from fsae.io import write_image
    from fsae.refine.psa.aff_labels import save_aff_label

    write_image(folder / "a.png", np.full((*la.shape[1:], 3), 128, np.uint8))
    save_aff_label(folder / "a.npz", keys, la, ha)
    return folder


def test_training_crop_pools_scores_before_the_argmax(tmp_path):
    """voc12/data.py:205-229 with train_aff.py:45-62: crop, then 8 x 8 means of the scores, then the argmax."""
    la = np.zeros((2, 16, 16), np.float32)
    la[0], la[1] = 0.6, 0.4
    la[1, :8, 5:8] = 1.0  # 3 of 8 columns of the top-left block: mean (3 * 1.0 + 5 * 0.4) / 8 = 0.625 > 0.6
    ha = la.copy()
    ha[0] = 0.1  # ha says foreground everywhere
    folder = write_label_pair(tmp_path, la, ha, np.array([2]))
    crops = AffinityCrops(folder, folder, ["a"], 16, color_jitter=(0, 0, 0, 0), hflip=False, image_ext=".png")
    sample = crops[0]  # the crop is the image: no random offset
    assert sample["image"].shape == (3, 16, 16)
    # the pooled scores make the block foreground although most of its pixels are background
    np.testing.assert_array_equal(sample["label"].numpy(), [[2, 255], [255, 255]])
    big = AffinityCrops(folder, folder, ["a"], 32, color_jitter=(0, 0, 0, 0), hflip=False, image_ext=".png")
    label = big[0]["label"].numpy()  # a 16 px image in a 32 px crop: blocks with no image pixel are ignored
    assert label.shape == (4, 4) and (label == 255).sum() >= 16 - 9
    np.testing.assert_allclose(pool(np.arange(64, dtype=np.float32).reshape(1, 8, 8), 4)[0],
                               [[13.5, 17.5], [45.5, 49.5]])


# ------------------------------------------------------------------------- pairs, affinity, loss


def test_pair_window_is_psas_index_set():
    for size in [(9, 9), (6, 13), (12, 10)]:
        window = pair_window(size, 5)
        ind_from, ind_to = psa_indices_of_pairs(5, size)
        assert window.sum() == len(ind_to)
        for d, (dy, dx) in enumerate(pair_set(5).directions):
            ys, xs = torch.nonzero(window[d], as_tuple=True)
            assert set((ys * size[1] + xs).tolist()) == set(ind_from.tolist())
    with pytest.raises(ValueError, match="too small"):
        pair_window((8, 8), 5)  # 8 columns < 2 * 4 + 1


def test_pair_affinity_matches_psa():
    torch.manual_seed(0)
    features = torch.randn(2, 6, 10, 12)
    ours = pair_affinity(features, 5)
    assert ours.shape == (2, len(psa_search_dist(5)), 10, 12)
    torch.testing.assert_close(window_values(ours, 5), psa_affinity(features, 5))


def test_affinity_labels_and_loss_match_psa():
    rng = np.random.default_rng(0)
    label = rng.choice([0, 0, 1, 3, 255], size=(2, 10, 12))
    ours = psa_affinity_labels(torch.from_numpy(label), 5)
    for b in range(2):
        for got, want in zip(ours, psa_extract_affinity_labels(label[b], 5)):
            np.testing.assert_array_equal(window_values(got[b], 5).numpy(), want)
            assert got[b].sum() == want.sum()  # nothing outside the window
    torch.manual_seed(0)
    features = torch.randn(2, 6, 10, 12)
    terms = affinity_loss(pair_affinity(features, 5), *ours)
    ref = psa_loss(psa_affinity(features, 5), *(torch.from_numpy(np.stack(
        [psa_extract_affinity_labels(label[b], 5)[i] for b in range(2)])) for i in range(3)))
    torch.testing.assert_close(terms["total"], ref)


def test_affinity_net_shapes_and_psa_head():
    net = AffinityNet(width=0.0625)
    assert net.f8_3.weight.shape[:2] == (64, 32) and net.f8_4.weight.shape[:2] == (128, 64)
    assert net.f8_5.weight.shape[:2] == (256, 256) and net.f9.weight.shape[:2] == (448, 448)
    assert all(m.bias is None for m in (net.f8_3, net.f8_4, net.f8_5, net.f9))
    assert not net.backbone.conv1a.weight.requires_grad  # PSA's not_training layers
    x = torch.randn(1, 3, 48, 72)
    with torch.no_grad():
        out = net.eval()(x)
        d = net.backbone.forward_features(x)  # resnet38_aff.py:36-41
        want = F.elu(net.f9(torch.cat([F.elu(net.f8_3(d["conv4"])), F.elu(net.f8_4(d["conv5"])),
                                       F.elu(net.f8_5(d["conv6"]))], dim=1)))
    assert out.shape == (1, 448, 6, 9)
    torch.testing.assert_close(out, want)


# ------------------------------------------------------------------------------------ the walk


@pytest.mark.parametrize("background, logt", [("power", 2), ("constant", 8)])
def test_walk_matches_psa(background, logt):
    torch.manual_seed(0)
    net = AffinityNet(width=0.0625, feature_channels=(8, 8, 8)).eval()
    rng = np.random.default_rng(2)
    image = rng.integers(0, 255, (43, 77, 3), dtype=np.uint8)  # not multiples of 8: padded as PSA
    keys = np.array([1, 4])
    cams = rng.random((2, 43, 77)).astype(np.float32)
    cfg = PSAWalkConfig(background=background, alpha=16, bg_threshold=0.39, beta=8, logt=logt)
    with torch.no_grad():
        from fsae.augment import normalize
        from fsae.infer import to_tensor_image

        x = F.pad(normalize(to_tensor_image(image)), (0, 80 - 77, 0, 48 - 43))
        features = net(x[None])
    # infer_aff.py:96-100 (PSA: the power) and MCTformer psa/infer_aff.py:117 (the constant)
    full = np.zeros((3, 43, 77), np.float32)
    full[1:] = cams
    full[0] = (1 - full[1:].max(0)) ** 16 if background == "power" else 0.39
    want_pred, want_rw = psa_walk(full, features, beta=8, logt=logt, radius=5)
    got = propagate(walk_scores(torch.from_numpy(cams), cfg), features[0], cfg)
    torch.testing.assert_close(got, want_rw, rtol=1e-4, atol=1e-6)
    mask = psa_mask(net, image, keys, cams, cfg)
    np.testing.assert_array_equal(mask, np.array([0, 1, 4])[want_pred])
    assert (psa_mask(net, image, np.zeros(0, int), np.zeros((0, 43, 77), np.float32), cfg) == 0).all()


# ------------------------------------------------------------------------------------- recipes


def test_voc_recipe_is_mctformers_psa():
    cfg = load_psa_config(REPO / "configs/voc/psa.yaml")
    expected = {  # MCTformer 9606597: main.py:144-145, psa/train_aff.py:17-27, psa/infer_aff.py:73-76
        ("aff_label", "low_alpha"): 1, ("aff_label", "high_alpha"): 12,
        ("aff_label.crf", "bilateral_sxy"): 80, ("aff_label.crf", "bilateral_srgb"): 13,
        ("train", "batch_size"): 8, ("train", "epochs"): 5, ("train", "lr"): 0.01,
        ("train", "weight_decay"): 5e-4, ("train", "crop_size"): 448, ("train", "radius"): 5,
        ("walk", "beta"): 8, ("walk", "logt"): 6, ("walk", "background"): "constant", ("walk", "bg_threshold"): 0.39,
    }
    for (section, name), value in expected.items():
        part = cfg
        for attr in section.split("."):
            part = getattr(part, attr)
        assert getattr(part, name) == value, (section, name)
    psa = load_psa_config()  # PSA's own defaults: infer_cls.py:25-26, train_aff.py:18-27, infer_aff.py:59-62
    assert (psa.aff_label.low_alpha, psa.aff_label.high_alpha, psa.train.epochs, psa.train.lr) == (4, 32, 8, 0.1)
    assert (psa.walk.background, psa.walk.alpha, psa.walk.beta, psa.walk.logt) == ("power", 16, 8, 8)
    load_psa_config(REPO / "configs/synthetic/psa.yaml")
    with pytest.raises(ConfigError, match="walk.background"):
        load_psa_config(overrides=["walk.background=otsu"])
    with pytest.raises(ConfigError, match="multiple of 8"):
        load_psa_config(overrides=["train.crop_size=100"])
    with pytest.raises(ConfigError, match="at least 72 px"):  # 8 columns < 2 * 4 + 1 of PSA's window
        load_psa_config(overrides=["train.crop_size=64"])


# ------------------------------------------------------------------ the stage on a tiny data set


def tiny_psa_config(path: Path, epochs=2) -> Path:
    path.write_text(yaml.safe_dump({
        "name": "tiny_psa", "device": "cpu", "aff_label": {"workers": 1},
        "net": {"width": 0.0625, "feature_channels": [8, 8, 16], "freeze_bn": False, "freeze_stem": False},
        "train": {"epochs": epochs, "batch_size": 4, "crop_size": 64, "radius": 4, "lr": 0.01},
        "walk": {"radius": 4, "logt": 4, "background": "constant"},
    }))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """8 images of 64 px; seeds from the GT masks (blurred, noisy), so no CAM network is needed."""
    root = tmp_path_factory.mktemp("psa")
    data = generate(root / "data", SyntheticSpec(num_train=8, num_val=0, image_size=64, body_axes=(10.0, 16.0),
                                                 part_radius=(2.0, 3.0), seed=3), progress=False)
    rng = np.random.default_rng(0)
    ids = sorted(p.stem for p in (data / "SegmentationClass").glob("*.png"))
    for i in ids:
        gt = read_mask(data / "SegmentationClass" / f"{i}.png")
        keys = np.array(sorted(set(np.unique(gt)) - {0, 255}))
        cams = np.stack([(gt == k).astype(np.float32) for k in keys]) if len(keys) else np.zeros((0, 64, 64))
        cams = np.clip(cams * rng.uniform(0.5, 1.0, cams.shape) + rng.uniform(0, 0.2, cams.shape), 0, 1)
        save_seed(root / "run" / "seeds" / f"{i}.npz", keys, cams.astype(np.float32))
    return root, data, ids


# PSA's training loop (fsae.refine.affinity.fit_affinity_net) writes psa.pt through fsae.train.save_checkpoint
PSA_TRAIN_WRITE = "fsae.train.atomic_write"


def test_psa_training_killed_mid_run_resumes_to_the_same_weights(tiny_run, tmp_path):
    root, data, ids = tiny_run
    config = tiny_psa_config(tmp_path / "psa.yaml", epochs=3)
    images = str(data / "JPEGImages")
    assert cli(["psa", str(root / "run"), "--config", str(config), "--images", images, "--step", "labels"]) == 0
    for name in ("straight", "killed"):
        (tmp_path / name).mkdir()
        os.symlink(root / "run" / "seeds", tmp_path / name / "seeds")
        os.symlink(root / "run" / "aff_labels", tmp_path / name / "aff_labels")
    args = ["--config", str(config), "--images", images, "--step", "train"]
    straight = run_fsae("psa", str(tmp_path / "straight"), *args)
    assert straight.returncode == 0, straight.stderr[-2000:]
    killed = run_fsae("psa", str(tmp_path / "killed"), *args, killed_at=(PSA_TRAIN_WRITE, 2), tmp=tmp_path)  # dies writing epoch 2
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    left = torch.load(tmp_path / "killed" / "psa" / "psa.pt", weights_only=True)
    assert left["epoch"] == 1 and left["step"] == 2
    assert [p for p in (tmp_path / "killed" / "psa").iterdir() if p.name.startswith(".psa.pt")]  # the half write
    resumed = run_fsae("psa", str(tmp_path / "killed"), *args)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    want = torch.load(tmp_path / "straight" / "psa" / "psa.pt", weights_only=True)
    got = torch.load(tmp_path / "killed" / "psa" / "psa.pt", weights_only=True)
    assert got["epoch"] == want["epoch"] == 3 and got["step"] == want["step"] == 6
    for key, value in want["model"].items():
        torch.testing.assert_close(got["model"][key], value, rtol=0, atol=0, msg=key)
    for key, value in want["optimizer"]["state"].items():
        for name, tensor in value.items():
            torch.testing.assert_close(got["optimizer"]["state"][key][name], tensor, rtol=0, atol=0)


def test_fsae_psa_end_to_end_resumes_and_shards(tiny_run, tmp_path, capsys):
    root, data, ids = tiny_run
    run = tmp_path / "run"
    run.mkdir()
    os.symlink(root / "run" / "seeds", run / "seeds")
    config = tiny_psa_config(tmp_path / "psa.yaml", epochs=1)
    base = ["psa", str(run), "--config", str(config), "--images", str(data / "JPEGImages")]
    assert cli([*base, "--step", "labels", "--shard", "1/2"]) == 0
    assert sorted(p.stem for p in (run / "aff_labels").glob("*.npz")) == ids[1::2]
    assert cli([*base, "--step", "train"]) == 2  # half the labels are missing
    assert "affinity labels missing" in capsys.readouterr().err
    assert cli([*base, "--shard", "0/2"]) == 2  # training cannot be sharded
    assert cli(base) == 0
    out = capsys.readouterr().out
    assert "affinity labels: " in out and "(4 written, 4 already there)" in out and "psa checkpoint:" in out
    masks = sorted((run / "psa_masks").glob("*.png"))
    assert [p.stem for p in masks] == ids and (run / "psa" / "config.yaml").is_file()
    for i in ids:
        mask = read_mask(run / "psa_masks" / f"{i}.png")
        with np.load(root / "run" / "seeds" / f"{i}.npz") as seed:
            assert set(np.unique(mask)) <= {0, *seed["keys"].tolist()}
    sentinel = np.full((64, 64), 3, np.uint8)
    write_mask(run / "psa_masks" / f"{ids[0]}.png", sentinel)  # finished: must not be redone
    (run / "psa_masks" / f"{ids[1]}.png").unlink()  # missing: must be
    assert cli(base) == 0
    assert "pseudo-masks: " in capsys.readouterr().out
    np.testing.assert_array_equal(read_mask(run / "psa_masks" / f"{ids[0]}.png"), sentinel)
    assert (run / "psa_masks" / f"{ids[1]}.png").is_file()
    assert cli([*base, "--set", "train.lr=0.5"]) == 2  # the checkpoint was trained with other settings
    assert "psa: made with train.lr 0.01, now 0.5; rerun with --force" in capsys.readouterr().err


def test_psa_outputs_made_otherwise_are_refused_then_redone_with_force(tiny_run, tmp_path, capsys):
    """Each PSA folder is stamped: other walk settings stop the masks step only; new seeds stop the labels
    step (the old labels, network and masks would be taken as finished); --force redoes them."""
    root, data, ids = tiny_run
    run = tmp_path / "run"
    shutil.copytree(root / "run" / "seeds", run / "seeds")
    write_json(stamp_path(run / "seeds"), make_stamp("cam", {"checkpoint": "a1"}, {}))
    config = tiny_psa_config(tmp_path / "psa.yaml", epochs=1)
    base = ["psa", str(run), "--config", str(config), "--images", str(data / "JPEGImages")]
    assert cli(base) == 0
    label_stamp, net = read_stamp(run / "aff_labels"), (run / "psa" / "psa.pt").read_bytes()
    assert label_stamp["inputs"]["seeds"] == folder_digest(run / "seeds")

    assert cli([*base, "--set", "walk.beta=4"]) == 2
    assert "psa_masks: made with walk.beta 8.0, now 4.0; rerun with --force" in capsys.readouterr().err
    assert cli([*base, "--set", "walk.beta=4", "--step", "masks", "--force"]) == 0
    assert read_stamp(run / "psa_masks")["settings"]["walk"]["beta"] == 4.0
    assert (run / "psa" / "psa.pt").read_bytes() == net  # training untouched

    write_json(stamp_path(run / "seeds"), make_stamp("cam", {"checkpoint": "b2"}, {}))  # `fsae cam` made again
    capsys.readouterr()
    assert cli(base) == 2
    err = capsys.readouterr().err
    assert "aff_labels: made with seeds" in err and "rerun with --force" in err, err
    assert cli([*base, "--force"]) == 0
    new_seeds = folder_digest(run / "seeds")
    assert read_stamp(run / "aff_labels")["inputs"]["seeds"] == new_seeds != label_stamp["inputs"]["seeds"]
    assert read_stamp(run / "psa")["inputs"]["aff_labels"] == folder_digest(run / "aff_labels")
    assert read_stamp(run / "psa_masks")["inputs"]["psa"] == folder_digest(run / "psa")
    assert sorted(p.stem for p in (run / "psa_masks").glob("*.png")) == ids
    assert cli([*base, "--force", "--shard", "0/2", "--step", "labels"]) == 2  # a shard would delete the others' work
