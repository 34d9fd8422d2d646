"""train.precision / train.channels_last / train.compile and infer.precision on CPU against fp32."""

import copy
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from fsae.config import load_config
from fsae.data.voc import VOCDataset
from fsae.infer import multiscale_cam
from fsae.methods import build_method
from fsae.train import NonFiniteGuard, TrainViews, build_optimizer, grad_scaler, train, train_step
from fsae.two_view import TwoViewFSAE

RECIPE = Path(__file__).resolve().parents[1] / "configs" / "synthetic" / "cam_fsae.yaml"
STEPS = 4
# Measured on this CPU (4 steps, tinycnn width 8, 64 px crops, batch 8, largest relative difference of the
# loss, cls and fsae terms): bf16 1.4e-3, fp16 6.3e-3 (with its GradScaler); the tolerances leave ~5x margin.
TOLERANCE = {"bf16": 1e-2, "fp16": 3e-2}


def step_config(root, **train):
    cfg = load_config(RECIPE, [f"data.root={root}", "data.long_side=null", "data.crop_size=64", "model.width=8",
                               "train.batch_size=8", "train.val_every=0", "fsae.start_epoch=0", "train.log_every=1",
                               "train.epochs=3", "infer.scales=[1.0, 0.5]",
                               "model.background_logit=5.0"])  # untrained: low CAMs are confident background
    for key, value in train.items():
        setattr(cfg.train, key, value)
    return cfg


def losses_of_steps(root, initial, **train) -> list[dict[str, float]]:
    """``STEPS`` training steps from ``initial`` weights on the same batches; each step's loss terms."""
    cfg = step_config(root, **train)
    views = TrainViews(VOCDataset(root, "train", num_classes=4), cfg.data, seed=0)
    model = copy.deepcopy(initial).train()
    if cfg.train.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(model, cfg.optim)
    two_view = TwoViewFSAE(cfg.fsae, model, cfg.train.seed, cfg.data.jitter, cfg.train.precision,
                           cfg.train.channels_last)
    forward = torch.compile(model) if cfg.train.compile else model
    guard = NonFiniteGuard(skip=False, device="cpu")
    scaler = grad_scaler(cfg, torch.device("cpu"))
    out = []
    for step, batch in zip(range(STEPS), DataLoader(views, batch_size=8, shuffle=False)):
        terms = train_step(model, optimizer, batch, cfg, two_view, guard, 0, step, "cpu", forward, scaler)
        out.append({k: v.item() for k, v in terms.items() if k in ("loss", "cls", "fsae")})
    guard.check()
    return out


@pytest.fixture(scope="module")
def fp32(tiny_synthetic):
    root, _ = tiny_synthetic
    torch.manual_seed(0)
    initial = build_method(step_config(root).model, 4)
    return root, initial, losses_of_steps(root, initial)


def max_relative(a: list[dict], b: list[dict]) -> float:
    return max(abs(x[k] - y[k]) / max(abs(y[k]), 1e-6) for x, y in zip(a, b) for k in y)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_steps_stay_near_fp32(fp32, precision):
    root, initial, reference = fp32
    assert all(step["fsae"] > 0 for step in reference)  # the FSAE term is on from the first step
    mixed = losses_of_steps(root, initial, precision=precision)
    diff = max_relative(mixed, reference)
    print(f"{precision}: max relative loss difference over {STEPS} steps {diff:.1e}")
    assert 0 < diff <= TOLERANCE[precision]  # > 0: autocast did run in the lower precision


def test_channels_last_steps_equal_fp32(fp32):
    root, initial, reference = fp32
    assert max_relative(losses_of_steps(root, initial, channels_last=True), reference) <= 1e-5


@pytest.mark.slow  # inductor compiles the forward and backward graphs: ~70 s on a 2-core CPU
def test_compiled_forward_equals_fp32(fp32):
    root, initial, reference = fp32
    started = time.time()
    try:
        compiled = losses_of_steps(root, initial, compile=True)
    except (ImportError, RuntimeError) as error:  # inductor's CPU backend needs a working C++ toolchain
        pytest.skip(f"torch.compile does not run on this CPU: {type(error).__name__}: {str(error)[:200]}")
    print(f"compile: {time.time() - started:.0f} s")
    assert max_relative(compiled, reference) <= 1e-5


@pytest.mark.parametrize("train_cfg", [{"channels_last": True}, {"precision": "bf16"}])
def test_resume_is_bit_exact(tiny_synthetic, tmp_path, train_killed_after_epoch, train_cfg):
    root, _ = tiny_synthetic
    cfg = step_config(root, **train_cfg)
    straight = torch.load(train(cfg, tmp_path / "straight", progress=False), weights_only=True)
    train_killed_after_epoch(cfg, tmp_path / "resumed", 2)
    resumed = torch.load(train(cfg, tmp_path / "resumed", progress=False), weights_only=True)
    assert resumed["step"] == straight["step"] == 9
    for key, value in straight["model"].items():
        torch.testing.assert_close(resumed["model"][key], value, rtol=0, atol=0, msg=key)


def test_cam_inference_in_bf16_stays_near_fp32(fp32):
    _, initial, _ = fp32
    model = copy.deepcopy(initial).eval()
    images = torch.rand(2, 3, 64, 48)
    reference = multiscale_cam(model, images, (1.0, 0.5), True)
    mixed = multiscale_cam(model, images, (1.0, 0.5), True, precision="bf16")
    assert mixed.dtype == torch.float32
    diff = ((mixed - reference).abs().max() / reference.abs().max()).item()
    print(f"CAM bf16: max difference / max CAM {diff:.1e}")
    assert 0 < diff <= 5e-2  # measured 1.1e-2
    assert torch.equal(multiscale_cam(model, images, (1.0, 0.5), True, precision="fp32"), reference)


def test_fp16_without_autocast_on_the_device_is_refused(monkeypatch):
    from fsae.errors import ConfigError

    cfg = load_config(None, ["train.precision=fp16"])
    assert grad_scaler(load_config(None), torch.device("cpu")) is None
    assert isinstance(grad_scaler(cfg, torch.device("cpu")), torch.amp.GradScaler)
    monkeypatch.setattr(torch.amp.autocast_mode, "is_autocast_available", lambda device_type: False)
    with pytest.raises(ConfigError, match="train.precision fp16: torch has no autocast on cpu"):
        grad_scaler(cfg, torch.device("cpu"))


def test_forward_outputs_come_back_in_fp32_with_gradient(fp32):
    from fsae.two_view import model_forward

    _, initial, _ = fp32
    model = copy.deepcopy(initial).train()
    x, labels = torch.rand(2, 3, 32, 32), torch.tensor([[1.0, 0, 0, 1], [0, 1, 0, 0]])
    out = model_forward(model, x, labels, "bf16", channels_last=True)
    tensors = [out.logits, out.score_map, *out.extras.values()]
    assert all(t.dtype == torch.float32 for t in tensors)  # the losses and eq. 5-9 see fp32
    out.score_map.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
