"""The two-view FSAE step (fsae/two_view.py) pinned by hand-worked cases, as eq. 5-9 are in test_fsae_loss.py.

A toy method stands in for a network: its score map (B, C+1, h, w) is a parameter map plus ``w`` times the
input's channel mean pooled to (h, w), so every score is written out by hand; it records each input it sees.
Covered: the strong view the student sees (eq. 3), the teacher kinds (reuse / separate / ema), the EMA update,
the masking of absent classes in the teacher's and the student's maps before eq. 5-9, the padding mask and
the zero term before ``start_epoch``.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fsae.config import FSAEConfig
from fsae.two_view import TwoViewFSAE, update_ema

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Out:
    def __init__(self, score_map):
        self.score_map = score_map


class Toy(nn.Module):
    """score_map = maps + w * avg_pool(mean over RGB of x) (B, C+1, h, w); ``seen`` holds every input."""

    def __init__(self, maps: torch.Tensor):
        super().__init__()
        self.maps = nn.Parameter(maps.clone())  # (1, C+1, h, w)
        self.w = nn.Parameter(torch.zeros(()))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))  # an integer buffer (BN's counter)
        self.seen: list[torch.Tensor] = []

    def forward(self, x, labels):
        self.seen.append(x.detach().clone())
        pooled = nn.functional.adaptive_avg_pool2d(x.mean(1, keepdim=True), self.maps.shape[-2:])
        return Out(self.maps + self.w * pooled)


def fsae_cfg(**kw) -> FSAEConfig:
    return FSAEConfig(enabled=True, start_epoch=0, **kw)


def generators(*seeds):
    return [torch.Generator().manual_seed(s) for s in seeds]


# ----------------------------------------------------------------------------------------- the EMA update


def test_ema_update_keeps_decay_of_the_ema_and_one_minus_decay_of_the_model():
    model = Toy(torch.zeros(1, 3, 1, 2))
    fs = TwoViewFSAE(fsae_cfg(teacher="ema", ema_decay=0.75), model)
    assert all(not p.requires_grad for p in fs.ema.parameters())
    with torch.no_grad():
        model.maps.fill_(4.0)  # the student moves from 0 to 4
        model.w.fill_(-8.0)
    model.steps.fill_(7)
    fs.after_update(model)
    # 0.75 * 0 + 0.25 * 4 = 1 (swapped weights give 0.25 * 0 + 0.75 * 4 = 3)
    assert fs.ema.maps.tolist() == [[[[1.0, 1.0]], [[1.0, 1.0]], [[1.0, 1.0]]]]
    assert fs.ema.w.item() == -2.0
    assert fs.ema.steps.item() == 7 and fs.ema.steps.dtype == torch.long  # integer buffers: copied
    fs.after_update(model)  # a second step: 0.75 * 1 + 0.25 * 4 = 1.75
    assert fs.ema.maps[0, 0, 0, 0].item() == 1.75 and fs.ema.w.item() == -3.5
    assert model.maps[0, 0, 0, 0].item() == 4.0  # the student is left as it was


def test_update_ema_with_an_asymmetric_decay():
    ema, model = Toy(torch.full((1, 3, 1, 1), 2.0)), Toy(torch.full((1, 3, 1, 1), 10.0))
    update_ema(ema, model, 0.9)
    assert ema.maps.flatten().tolist() == pytest.approx([2.8] * 3)  # 0.9 * 2 + 0.1 * 10
    assert model.maps.flatten().tolist() == [10.0] * 3


def test_no_ema_copy_unless_the_teacher_is_ema():
    model = Toy(torch.zeros(1, 3, 1, 1))
    for teacher in ("reuse", "separate"):
        fs = TwoViewFSAE(fsae_cfg(teacher=teacher), model)
        assert fs.ema is None
        fs.after_update(model)  # nothing to follow
    assert TwoViewFSAE(FSAEConfig(enabled=False, teacher="ema"), model).ema is None


# --------------------------------------------------------------------------------------- the teacher kinds


def test_reuse_teacher_is_the_weak_views_output_detached_without_a_forward():
    model = Toy(torch.zeros(1, 3, 1, 2))
    fs = TwoViewFSAE(fsae_cfg(teacher="reuse"), model)
    own = torch.tensor([[[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]]], requires_grad=True) * 1.0
    got = fs.teacher_scores(model, torch.zeros(1, 3, 4, 8), torch.ones(1, 2), Out(own))
    assert got.tolist() == [[[[1.0, 2.0]], [[3.0, 4.0]], [[5.0, 6.0]]]]
    assert not got.requires_grad and own.requires_grad
    assert model.seen == []


def test_separate_teacher_is_a_no_grad_pass_of_the_current_model_on_the_source():
    model = Toy(torch.zeros(1, 3, 1, 1))
    with torch.no_grad():
        model.w.fill_(2.0)
    fs = TwoViewFSAE(fsae_cfg(teacher="separate"), model)
    source = torch.full((1, 3, 2, 2), 0.5)
    got = fs.teacher_scores(model, source, torch.ones(1, 2), Out(torch.full((1, 3, 1, 1), 9.0)))
    assert got.flatten().tolist() == [1.0, 1.0, 1.0]  # 0 + 2 * 0.5: the model on source, not out_s (9)
    assert not got.requires_grad
    assert len(model.seen) == 1 and torch.equal(model.seen[0], source)
    with torch.no_grad():
        model.maps.fill_(3.0)  # the teacher follows the student at once
    assert fs.teacher_scores(model, source, torch.ones(1, 2), None).flatten().tolist() == [4.0] * 3


def test_ema_teacher_is_the_ema_copy_not_the_student():
    model = Toy(torch.zeros(1, 3, 1, 1))
    fs = TwoViewFSAE(fsae_cfg(teacher="ema", ema_decay=0.5), model)
    with torch.no_grad():
        model.maps.fill_(6.0)
    source = torch.zeros(1, 3, 2, 2)
    assert fs.teacher_scores(model, source, torch.ones(1, 2), None).flatten().tolist() == [0.0] * 3  # not yet followed
    fs.after_update(model)
    got = fs.teacher_scores(model, source, torch.ones(1, 2), None)
    assert got.flatten().tolist() == [3.0] * 3 and not got.requires_grad
    assert model.seen == [] and len(fs.ema.seen) == 2  # the student ran no teacher pass


# --------------------------------------------------------- masking of absent classes, the loss of one step

# C = 2 (channels fg0, fg1, bg), labels [0, 1]: class 0 absent. Score maps 1 x 2 (pixels a, b).
# Teacher: a = (5, 0, 0), b = (0, 5, 0). Masked: a = (0, 0, 0): max softmax 1/3 < 0.95, no pseudo-label;
#   b = (0, 5, 0): e^5 / (e^5 + 2) = 0.98670 >= 0.95, label fg1. Unmasked, a would be fg0 at 0.98670.
# Student: a = (1, 0, 0), b = (2, 1, 0); masked: a = (0, 0, 0), b = (0, 1, 0).
#   CE(b masked, fg1) = log(1 + e + 1) - 1 = log(2 + e) - 1 = 0.551444
#   (unmasked: log(e^2 + e + 1) - 1 = 1.407606; unmasked teacher adds CE(a masked, fg0) = log 3)
# eq. 9 with reduction mean: sum over M-hat / all N = 2 pixels -> 0.275722.
TEACHER = torch.tensor([[[[5.0, 0.0]], [[0.0, 5.0]], [[0.0, 0.0]]]])
STUDENT = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]], [[0.0, 0.0]]]])
LABELS = torch.tensor([[0.0, 1.0]])
CE_B = math.log(2 + math.e) - 1


def one_step(valid=None, gt=None, epoch=0, start_epoch=0, **kw):
    """The FSAE term of one step on the hand case: x_s (1, 3, 4, 8), no strong op or blur (the scores do not
    depend on the input: w = 0). Returns (loss, stats, student, out_s's score map)."""
    student = Toy(STUDENT)
    cfg = FSAEConfig(enabled=True, start_epoch=start_epoch, teacher="reuse", use_sae=False, strong_ops=0,
                     blur_prob=0.0, **kw)
    fs = TwoViewFSAE(cfg, student)
    x_s = torch.rand(1, 3, 4, 8, generator=torch.Generator().manual_seed(0))
    batch = {"valid": torch.ones(1, 4, 8, dtype=torch.bool) if valid is None else valid, "index": torch.tensor([0])}
    if gt is not None:
        batch["mask"] = gt
    own = TEACHER.clone().requires_grad_(True)
    loss, stats = fs.loss(student, student, x_s, x_s, LABELS, Out(own), batch, generators(1), epoch, "cpu")
    return loss, stats, student, own


def test_absent_classes_are_masked_in_the_teacher_and_the_student():
    loss, stats, student, own = one_step()
    assert loss.item() == pytest.approx(CE_B / 2, rel=1e-6)  # 0.275722
    assert stats["mask_ratio"].item() == 0.5  # pixel b only: the absent class does not label pixel a
    loss.backward()
    # gradient of CE(b) w.r.t. the student's logits / 2: softmax(0, 1, 0) - onehot(fg1), halved; the masked
    # absent channel gets none (its gate is 0), pixel a gets none (not in the mask)
    e = math.e
    assert student.maps.grad[0, :, 0, 1].tolist() == pytest.approx([0.0, (e / (2 + e) - 1) / 2, 1 / (2 + e) / 2])
    assert student.maps.grad[0, :, 0, 0].tolist() == [0.0, 0.0, 0.0]
    assert own.grad is None  # the teacher's map receives nothing


def test_padding_is_left_out_of_the_mask():
    valid = torch.ones(1, 4, 8, dtype=torch.bool)
    valid[:, :, 4:] = False  # the right half, pixel b's, is crop padding
    loss, stats, *_ = one_step(valid=valid)
    assert loss.item() == 0.0 and stats["mask_ratio"].item() == 0.0
    loss, stats, *_ = one_step(valid=valid, mask_padding=False)
    assert loss.item() == pytest.approx(CE_B / 2, rel=1e-6)


def test_pseudo_label_accuracy_against_the_gt_at_score_map_size():
    gt = torch.zeros(1, 4, 8, dtype=torch.long)
    gt[:, :, 4:] = 2  # label 2 = class 1 = channel fg1: pixel b's pseudo-label is right
    _, stats, *_ = one_step(gt=gt)
    assert stats["pl_accuracy"].item() == 1.0 and stats["pl_count"].item() == 1
    gt[:, :, 4:] = 1  # class 0: wrong
    _, stats, *_ = one_step(gt=gt)
    assert stats["pl_accuracy"].item() == 0.0 and stats["pl_count"].item() == 1


def test_the_term_is_zero_and_runs_nothing_before_start_epoch():
    loss, stats, student, _ = one_step(epoch=1, start_epoch=2)
    assert loss.item() == 0.0 and stats == {} and student.seen == []
    loss, _, student, _ = one_step(epoch=2, start_epoch=2)
    assert loss.item() == pytest.approx(CE_B / 2, rel=1e-6) and len(student.seen) == 1


# ------------------------------------------------------------------------------ what the student sees

# x_t with strong_ops 0, blur_prob 1, sigma 1 and a 3 x 3 kernel (blur_kernel per_run, seed 0 draws 3):
# the kernel is [a, b, a], b = 1 / (1 + 2 e^-0.5) = 0.451863, a = e^-0.5 b = 0.274069 (torchvision's
# Gaussian), so a unit impulse in a 7 x 7 image becomes b^2 there, a b at its 4 neighbours,
# a^2 at the diagonals, 0 beyond (the image's reflected border stays 0 when the impulse is
# 2 pixels or more inside).
B_K = 1 / (1 + 2 * math.exp(-0.5))
A_K = math.exp(-0.5) * B_K


def blurred_impulse(y: int, x: int) -> torch.Tensor:
    """(3, 7, 7): the 3 x 3 sigma-1 blur of a unit impulse at (y, x), 2 <= y, x <= 4, by hand."""
    out = torch.zeros(3, 7, 7)
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            out[:, y + dy, x + dx] = (B_K if dy == 0 else A_K) * (B_K if dx == 0 else A_K)
    return out


def normalized(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) in [0, 1] -> (x - mean) / std with ImageNet's constants written out."""
    mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
    return (image - mean) / std


def impulse(y: int, x: int) -> torch.Tensor:
    image = torch.zeros(3, 7, 7)
    image[:, y, x] = 1.0
    return image


@pytest.mark.parametrize("source", ["weak", "original"])
def test_the_student_sees_the_normalised_strong_view_and_the_teacher_the_source(source):
    """strong_source weak: A_s of the weak view x_s; original: A_s of the loader's crop (``images``), with its own
    colour jitter (none here). The student runs through ``forward_model``; a separate teacher through ``model``
    on ``source``, the normalised weak view given by the caller."""
    model, forward_model = Toy(torch.zeros(1, 3, 1, 1)), Toy(torch.zeros(1, 3, 1, 1))
    cfg = fsae_cfg(teacher="separate", strong_ops=0, blur_prob=1.0, blur=[1.0, 1.0], blur_kernel="per_run",
                   strong_source=source)
    fs = TwoViewFSAE(cfg, model, seed=0, jitter=None)
    assert fs.blur_kernel == 3
    x_s = torch.stack([impulse(3, 3), impulse(2, 4)])  # (2, 3, 7, 7) the weak views
    images = torch.stack([impulse(4, 2), impulse(4, 4)])  # the loader's crops, before the weak jitter
    source_map = torch.full((2, 3, 7, 7), 0.25)
    batch = {"valid": torch.ones(2, 7, 7, dtype=torch.bool), "index": torch.tensor([4, 9])}
    fs.loss(model, forward_model, x_s, source_map, torch.ones(2, 2), Out(None), batch, generators(1, 2), 0, "cpu",
            images=images)
    centres = [(3, 3), (2, 4)] if source == "weak" else [(4, 2), (4, 4)]
    expected = torch.stack([normalized(blurred_impulse(*c)) for c in centres])
    assert len(forward_model.seen) == 1
    torch.testing.assert_close(forward_model.seen[0], expected, rtol=0, atol=1e-6)
    assert len(model.seen) == 1 and torch.equal(model.seen[0], source_map)
