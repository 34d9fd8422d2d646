"""train.precision / train.channels_last / infer.precision of DeepLab (`fsae seg`), IRN and PSA on CPU against
fp32; fp32 hashes and stamps as before these settings existed; the training loaders' speed arguments."""

import copy
import json
import random
import shutil

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fsae.config import Config, load_config
from fsae.io import read_id_list, write_image, write_mask
from fsae.refine.irn import train as irn_train
from fsae.refine.irn.config import IRNConfig
from fsae.refine.irn.network import BoundaryNet, boundary_map
from fsae.refine.psa import train as psa_train
from fsae.refine.psa.config import PSAConfig
from fsae.refine.psa.network import AffinityNet
from fsae.segment import train as seg_train
from fsae.segment.config import SegConfig
from fsae.segment.deeplab import build_deeplab
from fsae.segment.infer import multiscale_probs, predict_split
from fsae.speed import loader_options
from fsae.stamps import section_settings

C = 4
STEPS = 4
# Largest relative difference of the loss over STEPS steps from the same weights and batches, measured on this
# CPU: DeepLab (tinycnn width 8, 48 px crops, batch 4) bf16 3.1e-3, fp16 7.4e-4 (with its GradScaler); IRN
# (resnet18, 32 px crops, batch 2) bf16 1.6e-3; PSA (ResNet-38 width 1/16, 64 px) bf16 6.7e-3. Tolerances: 3-7x.
TOLERANCE = {"seg": {"bf16": 2e-2, "fp16": 5e-3}, "irn": {"bf16": 1e-2}, "psa": {"bf16": 2e-2}}


def max_relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(y), 1e-6) for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------- DeepLab


@pytest.fixture(scope="module")
def seg_root(tiny_synthetic, tmp_path_factory):
    """The tiny set, its GT masks as the pseudo-masks."""
    src, _ = tiny_synthetic
    root = tmp_path_factory.mktemp("segprec") / "data"
    shutil.copytree(src, root)
    return root


def seg_config(root, **train) -> SegConfig:
    cfg = SegConfig(name="tiny")
    cfg.data.root, cfg.data.num_classes, cfg.data.mask_dir = str(root), C, str(root / "SegmentationClass")
    cfg.data.crop_size = 48
    cfg.model.backbone, cfg.model.width, cfg.model.freeze_bn, cfg.model.aspp_rates = "tinycnn", 8, False, [1, 2, 3, 4]
    cfg.optim.lr = 0.01
    cfg.train.batch_size, cfg.train.iterations, cfg.train.log_every, cfg.train.checkpoint_every = 4, STEPS, 1, 2
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def seg_losses(root, tmp_path, **train) -> list[float]:
    """The logged loss of each of ``STEPS`` iterations (same seed: same initial weights and batches)."""
    run = tmp_path / "_".join(f"{k}{v}" for k, v in train.items()) if train else tmp_path / "fp32"
    seg_train.train_segmentation(seg_config(root, **train), run, progress=False, allow_gt=True)
    rows = np.loadtxt(run / "metrics.csv", delimiter=",", skiprows=1, ndmin=2)
    return rows[:, 2].tolist()


@pytest.fixture(scope="module")
def seg_fp32(seg_root, tmp_path_factory):
    return seg_losses(seg_root, tmp_path_factory.mktemp("segfp32"))


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_deeplab_mixed_precision_steps_stay_near_fp32(seg_root, seg_fp32, tmp_path, precision):
    mixed = seg_losses(seg_root, tmp_path, precision=precision)
    diff = max_relative(mixed, seg_fp32)
    print(f"DeepLab {precision}: max relative loss difference over {STEPS} steps {diff:.1e}")
    assert 0 < diff <= TOLERANCE["seg"][precision]  # > 0: autocast did run in the lower precision


def test_deeplab_channels_last_steps_equal_fp32(seg_root, seg_fp32, tmp_path):
    assert max_relative(seg_losses(seg_root, tmp_path, channels_last=True), seg_fp32) <= 1e-5


def test_deeplab_fp16_checkpoint_holds_the_grad_scaler(seg_root, tmp_path):
    seg_losses(seg_root, tmp_path, precision="fp16")
    state = torch.load(tmp_path / "precisionfp16" / "checkpoints" / "last.pt", weights_only=True)
    assert state["scaler"]["scale"] > 0 and state["iteration"] == STEPS


@pytest.mark.parametrize("train_cfg", [{}, {"precision": "bf16", "channels_last": True}, {"precision": "fp16"}])
def test_deeplab_resume_is_bit_exact(seg_root, tmp_path, train_cfg):
    cfg = seg_config(seg_root, iterations=6, **train_cfg)
    straight = seg_train.train_segmentation(cfg, tmp_path / "a", progress=False, allow_gt=True)

    def interrupt(iteration):
        if iteration == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        seg_train.train_segmentation(cfg, tmp_path / "b", progress=False, on_iteration=interrupt, allow_gt=True)
    resumed = seg_train.train_segmentation(cfg, tmp_path / "b", progress=False, allow_gt=True)
    a, b = torch.load(straight, weights_only=True), torch.load(resumed, weights_only=True)
    assert a["iteration"] == b["iteration"] == 6
    for key, value in a["model"].items():
        torch.testing.assert_close(b["model"][key], value, rtol=0, atol=0, msg=key)


def test_deeplab_inference_in_bf16_stays_near_fp32_and_is_stamped(seg_root, tmp_path):
    torch.manual_seed(0)
    model = build_deeplab(seg_config(seg_root).model, C).eval()
    with torch.no_grad():  # a head that says something: the default init scores every class ~equally
        for conv in model.head.branches:
            conv.weight.normal_(0, 0.3)
    images = torch.randn(2, 3, 48, 40)
    reference = multiscale_probs(model, images, (1.0, 0.75), True)
    mixed = multiscale_probs(model, images, (1.0, 0.75), True, precision="bf16")
    assert mixed.dtype == torch.float32
    diff = (mixed - reference).abs().max().item()
    print(f"DeepLab inference bf16: max probability difference {diff:.1e}")
    assert 0 < diff <= 1e-3  # measured 4.5e-5
    torch.testing.assert_close(mixed.sum(1), torch.ones(2, 48, 40))  # the softmaxes still sum to 1 (fp32)
    assert torch.equal(multiscale_probs(model, images, (1.0, 0.75), True, precision="fp32"), reference)
    ids = read_id_list(seg_root / "ImageSets/Segmentation/val.txt")[:2]
    items = [(i, seg_root / "JPEGImages" / f"{i}.jpg") for i in ids]
    for precision in ("fp32", "bf16"):
        predict_split(model, items, tmp_path / precision, None, [1.0], True, None, progress=False,
                      source={"checkpoint": "x"}, precision=precision)
    settings = {p: json.loads((tmp_path / f"{p}.stamp.json").read_text())["settings"] for p in ("fp32", "bf16")}
    assert settings["fp32"] == {"scales": [1.0], "flip": True, "fuse": "mean_probs", "crf": None}  # as before
    assert settings["bf16"] == {**settings["fp32"], "precision": "bf16"}


# ----------------------------------------------------------------------------------------- IRN, PSA


def affinity_set(root, n=4, size=48):
    """``n`` images with a bright square on a dark ground and its label map (1 inside, 0 outside, 255 on the
    rim): the IR labels of IRN's training."""
    rng = np.random.default_rng(0)
    ids = [f"img{i}" for i in range(n)]
    for k, i in enumerate(ids):
        image = rng.integers(0, 60, (size, size + 8, 3), dtype=np.uint8)
        label = np.zeros((size, size + 8), np.uint8)
        a, b = 8 + 2 * k, 30 + k
        image[a:b, a:b + 6] += 150
        label[a - 1:b + 1, a - 1:b + 7] = 255
        label[a + 1:b - 1, a + 1:b + 5] = 1
        write_image(root / "images" / f"{i}.png", image)
        write_mask(root / "ir" / f"{i}.png", label)
    return ids


def irn_config(**train) -> IRNConfig:
    cfg = IRNConfig()
    cfg.net.backbone, cfg.net.branch_width = "resnet18", 8
    cfg.train.crop_size, cfg.train.batch_size, cfg.train.epochs, cfg.train.radius = 32, 2, 2, 4
    cfg.train.scale_range = [0.8, 1.2]
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def affinity_losses(step_fn, model, loader, precision="fp32", channels_last=False) -> list[float]:
    """``STEPS`` SGD steps of ``step_fn`` (IRN's or PSA's ``train_step``) from ``model``'s weights."""
    model = copy.deepcopy(model).train()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    out = []
    for _, batch in zip(range(STEPS), loader):
        terms = step_fn(model, batch["image"], batch["label"], 4, precision, channels_last)
        optimizer.zero_grad()
        terms["total"].backward()
        optimizer.step()
        out.append(terms["total"].item())
    return out


@pytest.fixture(scope="module")
def irn_batches(tmp_path_factory):
    root = tmp_path_factory.mktemp("irnprec")
    ids = affinity_set(root)
    random.seed(0)  # the crops draw from Python's random (IRN's dataset)
    crops = irn_train.AffinityCrops(root / "images", root / "ir", ids, 32, (0.8, 1.2), image_ext=".png")
    batches = list(DataLoader(crops, batch_size=2))
    return root, ids, (batches * STEPS)[:STEPS]


def test_irn_bf16_steps_stay_near_fp32_and_channels_last_equals_it(irn_batches):
    torch.manual_seed(0)
    model = BoundaryNet("resnet18", None, 8)
    batches = irn_batches[2]
    reference = affinity_losses(irn_train.train_step, model, batches)
    mixed = affinity_losses(irn_train.train_step, model, batches, "bf16")
    diff = max_relative(mixed, reference)
    print(f"IRN bf16: max relative loss difference over {STEPS} steps {diff:.1e}")
    assert 0 < diff <= TOLERANCE["irn"]["bf16"]
    assert max_relative(affinity_losses(irn_train.train_step, model, batches, channels_last=True), reference) <= 1e-5


def test_irn_boundary_map_in_bf16_stays_near_fp32():
    torch.manual_seed(0)
    model = BoundaryNet("resnet18", None, 8).eval()
    image = torch.randn(3, 50, 37)
    reference = boundary_map(model, image, pad_to=64)
    mixed = boundary_map(model, image, pad_to=64, precision="bf16")
    diff = (mixed - reference).abs().max().item()
    print(f"IRN boundary map bf16: max difference {diff:.1e}")
    assert mixed.dtype == torch.float32 and 0 < diff <= 2e-2  # measured 2.4e-3


def test_irn_and_psa_pseudo_masks_in_bf16_agree_with_fp32():
    """walk.precision bf16: the network pass in bf16, the walk in fp32 (random networks, two Gaussian CAMs)."""
    from fsae.refine.irn.pipeline import pseudo_mask
    from fsae.refine.psa.config import PSAWalkConfig
    from fsae.refine.psa.walk import psa_mask

    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (64, 72, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:64, :72]
    cams = np.stack([np.exp(-((yy - 20) ** 2 + (xx - 20) ** 2) / 200),
                     np.exp(-((yy - 45) ** 2 + (xx - 50) ** 2) / 300)]).astype(np.float32)
    keys = np.array([1, 3])
    torch.manual_seed(0)
    irn, psa = BoundaryNet("resnet18", None, 8).eval(), AffinityNet(width=0.0625, feature_channels=(8, 8, 16)).eval()
    cfg = IRNConfig()
    cfg.train.crop_size, cfg.walk.radius, cfg.walk.exp_times = 64, 4, 4
    masks = {}
    for precision in ("fp32", "bf16"):
        cfg.walk.precision = precision
        masks["irn", precision] = pseudo_mask(irn, image, keys, cams, cfg)
        masks["psa", precision] = psa_mask(psa, image, keys, cams, PSAWalkConfig(radius=4, logt=4, precision=precision))
    for stage in ("irn", "psa"):
        agree = (masks[stage, "bf16"] == masks[stage, "fp32"]).mean()
        print(f"{stage} pseudo-mask bf16: {agree:.4%} of the pixels as in fp32")
        assert set(np.unique(masks[stage, "fp32"])) == {0, 1, 3} and agree >= 0.995  # measured 99.98%, 100%


def test_psa_bf16_steps_stay_near_fp32(irn_batches):
    _, _, batches = irn_batches  # 32 px crops: 4 x 4 at PSA's stride 8, labels from IRN's stride-4 maps pooled
    torch.manual_seed(0)
    # PSA's frozen BatchNorm (its default): a random ResNet-38 with BatchNorm in training mode on batches of 2
    # differs by 8% in bf16 already at the first step (docs/precision.md)
    model = AffinityNet(width=0.0625, feature_channels=(8, 8, 16))
    psa_batches = [{"image": torch.nn.functional.interpolate(b["image"], scale_factor=2.0),
                    "label": b["label"]} for b in batches]  # 64 px images, 8 x 8 labels: PSA's stride 8
    reference = affinity_losses(psa_train.train_step, model, psa_batches)
    mixed = affinity_losses(psa_train.train_step, model, psa_batches, "bf16")
    diff = max_relative(mixed, reference)
    print(f"PSA bf16: max relative loss difference over {STEPS} steps {diff:.1e}")
    assert 0 < diff <= TOLERANCE["psa"]["bf16"]


# ------------------------------------------------------------------- fp32 runs hash and stamp as before


def test_fp32_hashes_and_stamps_are_those_from_before_the_speedsection_settings():
    # The hashes of the default configs computed by the code before train.precision / channels_last / prefetch
    # existed in these stages (commit 317e9ca): their checkpoints still resume. Config's changed once since, when
    # model.background and model.sipe.score_map were removed (Config.removed_keys; resume compares the hash
    # of the checkpoint's saved config, tests/test_pipeline.py::test_a_checkpoint_saved_before_a_removal_resumes).
    before = {Config: "ab9992b61cb13eec", SegConfig: "48f7bfcbe2f99df1", IRNConfig: "249221ec1303748d",
              PSAConfig: "161ecd6297499dca"}
    for root, digest in before.items():
        cfg = root()
        assert cfg.hash() == digest, root.__name__
        cfg.train.channels_last = True  # not hashed (float rounding only, like the device), nor prefetch
        (cfg.data if root in (Config, SegConfig) else cfg.train).prefetch = 4
        assert cfg.hash() == digest, root.__name__
        cfg.train.precision = "bf16"
        assert cfg.hash() != digest, root.__name__
    irn = IRNConfig()
    assert set(section_settings(irn.train)) == {"epochs", "batch_size", "crop_size", "scale_range", "hflip", "radius", "lr",
                                         "weight_decay", "momentum", "poly_power", "seed"}  # the fp32 stamp's keys
    assert set(section_settings(irn.walk)) == {"radius", "beta", "exp_times", "bg_threshold"}
    irn.train.precision = irn.walk.precision = "bf16"
    assert section_settings(irn.train)["precision"] == section_settings(irn.walk)["precision"] == "bf16"


# ----------------------------------------------------------------------------------------- loaders


def test_loader_options_by_device_and_workers():
    assert loader_options(0, "cpu") == {"num_workers": 0, "pin_memory": False}
    assert loader_options(0, "cuda:1") == {"num_workers": 0, "pin_memory": True}  # no GPU needed to decide
    assert loader_options(2, "cuda", 4) == {"num_workers": 2, "pin_memory": True, "prefetch_factor": 4,
                                            "persistent_workers": True}
    assert loader_options(1, "cpu", 3, persistent=False)["persistent_workers"] is False


def spy_loader(monkeypatch, module):
    """Replace ``module.DataLoader`` by one that records its keyword arguments, then stops the stage."""
    seen = {}

    class Stop(Exception):
        pass

    def spy(*args, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(module, "DataLoader", spy)
    return seen, Stop


def test_the_stages_loaders_get_the_speed_arguments(seg_root, irn_batches, tmp_path, monkeypatch):
    seen, stop = spy_loader(monkeypatch, seg_train)
    cfg = seg_config(seg_root)
    cfg.data.workers, cfg.data.prefetch = 1, 3
    with pytest.raises(stop):
        seg_train.train_segmentation(cfg, tmp_path / "seg", progress=False, allow_gt=True)
    assert (seen["num_workers"], seen["prefetch_factor"], seen["persistent_workers"], seen["pin_memory"]) == \
        (1, 3, True, False)
    root, ids, _ = irn_batches
    seen, stop = spy_loader(monkeypatch, irn_train)
    cfg = irn_config(workers=2, prefetch=5)
    with pytest.raises(stop):
        irn_train.train_irn(cfg, root / "images", root / "ir", ids, tmp_path / "irn.pt", progress=False,
                            image_ext=".png")
    # not persistent: each epoch's workers are seeded from the generator a resumed run restores
    assert (seen["num_workers"], seen["prefetch_factor"], seen["persistent_workers"]) == (2, 5, False)
    assert seen["worker_init_fn"] is irn_train.seed_loader_worker


def test_persistent_workers_see_each_epoch_and_resume_stays_exact(tiny_synthetic, tmp_path, train_killed_after_epoch):
    """Workers kept across epochs must draw epoch 2's crops, not epoch 1's again: one worker gives the weights of
    no worker, and a run killed after epoch 1 resumes to them."""
    import fsae.train as train_module

    root, _ = tiny_synthetic
    overrides = [f"data.root={root}", "data.long_side=null", "data.crop_size=32", "model.width=8",
                 "train.batch_size=8", "train.val_every=0", "train.epochs=2", "train.tensorboard=false",
                 "fsae.enabled=true", "fsae.start_epoch=0"]
    cfg0, cfg1 = load_config(None, overrides), load_config(None, overrides + ["data.workers=1"])
    _, _, loader = train_module.build_loader(cfg1, 0, 1)
    assert loader.persistent_workers and loader.prefetch_factor == 2 and not loader.pin_memory
    weights = {}
    for name, cfg in (("none", cfg0), ("one", cfg1)):
        weights[name] = torch.load(train_module.train(cfg, tmp_path / name, progress=False), weights_only=True)
    train_killed_after_epoch(cfg1, tmp_path / "resumed", 1)
    weights["resumed"] = torch.load(train_module.train(cfg1, tmp_path / "resumed", progress=False), weights_only=True)
    for name in ("one", "resumed"):
        assert weights[name]["step"] == weights["none"]["step"] == 6
        for key, value in weights["none"]["model"].items():
            torch.testing.assert_close(weights[name]["model"][key], value, rtol=0, atol=0, msg=f"{name} {key}")


def test_the_training_loader_leaves_the_global_rng_alone(tiny_synthetic):
    """Its own generator: the global torch RNG (dropout, drop-path), which a checkpoint saves and a resumed run
    restores, is not drawn from by starting an epoch, so a resume at any step sees the uninterrupted stream."""
    import fsae.train as train_module

    root, _ = tiny_synthetic
    cfg = load_config(None, [f"data.root={root}", "data.long_side=null", "data.crop_size=32", "train.batch_size=8"])
    _, _, loader = train_module.build_loader(cfg, 0, 1)
    before = torch.get_rng_state()
    for _ in range(2):  # two epochs' starts and first batches
        next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)
