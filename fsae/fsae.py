"""The paper's contribution: online pseudo-labels (eq. 5-8) and the FSAE loss (eq. 9).

Pure functions on tensors. Score maps are ``(B, C + 1, H, W)`` raw logits with the foreground
channels first and the background channel LAST (``fsae.labels``); pseudo-labels are channel indices
in that layout (background = ``C``); ``fsae.labels.channel_to_label`` converts them to the
segmentation label space.

Where the paper leaves a detail open, the default follows the authors' PPC-based code:
- absent classes: foreground logits are multiplied by the image-level label (``mask_absent_classes``),
  so an absent class scores 0, not -inf; the softmax runs over all C + 1 channels;
- FAE (eq. 6) thresholds the max softmax over all channels, background included;
- SAE (eq. 7) dilates only the FOREGROUND-confident region (max foreground softmax >= tau_fae) with a
  k x k square that does not reach in from outside the image, and keeps ring pixels whose max softmax
  is >= tau_sae;
- eq. 9 is reduced by the mean over all B*H*W pixels (``reduction="mean"``); ``"masked_mean"``
  divides by the number of pseudo-labelled pixels instead.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fsae.labels import IGNORE_INDEX, channel_to_label

REDUCTIONS = ("mean", "masked_mean")
LOSS_FORMS = ("union", "two_term")
# The names of fsae_loss's statistics (not loss terms).
STATISTICS = ("mask_ratio", "confident_ratio", "fg_confident_ratio", "ring_ratio", "boundary_ratio", "sae_added_ratio",
              "pl_accuracy", "pl_count")


def mask_absent_classes(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Multiply the foreground logits by the image-level label; the background channel is kept.

    Shape: scores (B, C+1, H, W), labels (B, C) multi-hot -> (B, C+1, H, W).
    """
    num_classes = scores.shape[1] - 1
    if labels.shape != (scores.shape[0], num_classes):
        raise ValueError(
            f"labels must have shape (B, C) = ({scores.shape[0]}, {num_classes}) to match scores "
            f"{tuple(scores.shape)}; got {tuple(labels.shape)}"
        )
    gate = torch.cat([labels.to(scores.dtype), labels.new_ones(labels.shape[0], 1).to(scores.dtype)], 1)
    return scores * gate[:, :, None, None]


def _dilate(mask: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Binary dilation with a k x k square; max-pool pads with -inf so nothing enters from outside."""
    if kernel_size % 2 != 1 or kernel_size < 1:
        raise ValueError(f"kernel_size must be an odd positive integer, got {kernel_size}")
    pooled = F.max_pool2d(mask[:, None].float(), kernel_size, stride=1, padding=kernel_size // 2)
    return pooled[:, 0] > 0


@torch.no_grad()
def pseudo_label_parts(
    source_scores: torch.Tensor,
    tau_fae: float = 0.95,
    tau_sae: float = 0.8,
    kernel_size: int = 3,
    use_sae: bool = True,
) -> dict[str, torch.Tensor]:
    """All intermediate masks of eq. 5-8, for the loss and for inspection.

    Shape: source_scores (B, C+1, H, W) -> each entry (B, H, W):
    ``labels`` (long, eq. 5), ``confident`` (bool, M of eq. 6), ``fg_confident`` (the part of M whose
    max foreground softmax passes tau_fae: what SAE dilates), ``ring`` (Dilation(M_fg) - M_fg),
    ``boundary`` (M_bdry of eq. 7), ``mask`` (M-hat of eq. 8).
    """
    if source_scores.dim() != 4:
        raise ValueError(f"source_scores must be (B, C+1, H, W), got {tuple(source_scores.shape)}")
    num_classes = source_scores.shape[1] - 1
    prob = source_scores.detach().float().softmax(dim=1)
    max_prob, labels = prob.max(dim=1)  # eq. 5: P_s = argmax(S_s)
    confident = max_prob >= tau_fae  # eq. 6: M
    fg_confident = prob[:, :num_classes].max(dim=1).values >= tau_fae
    if use_sae:
        ring = _dilate(fg_confident, kernel_size) & ~fg_confident  # eq. 7: Dilation(M) - M
        boundary = ring & (max_prob >= tau_sae)  # eq. 7: ... and softmax(S_s) >= tau_SAE
    else:
        ring = torch.zeros_like(confident)
        boundary = ring
    mask = confident | boundary  # eq. 8: M-hat = M ∪ M_bdry
    return {
        "labels": labels,
        "confident": confident,
        "fg_confident": fg_confident,
        "ring": ring,
        "boundary": boundary,
        "mask": mask,
    }


@torch.no_grad()
def online_pseudo_label(
    source_scores: torch.Tensor,
    tau_fae: float = 0.95,
    tau_sae: float = 0.8,
    kernel_size: int = 3,
    use_sae: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Online pseudo-labels of the source (weak) view, eq. 5-8.

    Shape: source_scores (B, C+1, H, W) -> labels long (B, H, W) in channel space (background = C),
    mask bool (B, H, W). Computed without gradient (the source pass is the teacher).
    """
    parts = pseudo_label_parts(source_scores, tau_fae, tau_sae, kernel_size, use_sae)
    return parts["labels"], parts["mask"]


def fsae_loss(
    source_scores: torch.Tensor,
    target_scores: torch.Tensor,
    tau_fae: float = 0.95,
    tau_sae: float = 0.8,
    kernel_size: int = 3,
    weight: float = 1.0,
    use_sae: bool = True,
    reduction: str = "mean",
    valid: torch.Tensor | None = None,
    gt: torch.Tensor | None = None,
    form: str = "union",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The FSAE loss, eq. 9: lambda * CE(S_t, P_s) on the expanded confident mask M-hat.

    ``form="two_term"`` is the FSAE authors' code instead (obeychoi0120/wseg, branch ssl,
    module/train.py:396-403): ``mean(CE * M) + lambda * mean(CE * M_bdry)``, both means over all
    B*H*W pixels, so a pixel in both M and M_bdry counts twice (``reduction`` must be "mean").

    Shape: source_scores, target_scores (B, C+1, H, W); optional ``valid`` bool (B, H, W) excludes
    pixels (e.g. crop padding) from the mask; optional ``gt`` (B, H, W) in the segmentation label
    space (255 = ignore) adds the pseudo-label accuracy on the mask to the stats (the paper's Fig. 6).
    Only ``target_scores`` receive gradient. Returns ``(loss, stats)``; the loss is a finite zero that
    still carries gradient when no pixel is pseudo-labelled. ``stats`` are 0-dim tensors on the score
    maps' device (no host sync here; the training loop turns them into numbers at log steps).
    """
    if source_scores.shape != target_scores.shape:
        raise ValueError(
            f"source and target score maps must have the same shape (same view geometry); got "
            f"{tuple(source_scores.shape)} and {tuple(target_scores.shape)}"
        )
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if form not in LOSS_FORMS or (form == "two_term" and reduction != "mean"):
        raise ValueError(f"form must be one of {LOSS_FORMS} (two_term with reduction 'mean'), got {form!r}")
    parts = pseudo_label_parts(source_scores, tau_fae, tau_sae, kernel_size, use_sae)
    labels, mask = parts["labels"], parts["mask"]
    if valid is not None:
        mask = mask & valid.to(torch.bool)
    pixel_ce = F.cross_entropy(target_scores.float(), labels, reduction="none")  # (B, H, W)
    masked = (pixel_ce * mask).sum()
    if reduction == "mean":
        loss = masked / mask.numel()  # eq. 9: 1/N sum_n sum_i M-hat_i CE, N = all B*H*W pixels
    else:
        loss = masked / mask.sum().clamp(min=1)
    loss = weight * loss
    if form == "two_term":
        confident, boundary = parts["confident"], parts["boundary"]
        if valid is not None:
            confident, boundary = confident & valid.to(torch.bool), boundary & valid.to(torch.bool)
        loss = (pixel_ce * confident).mean() + weight * (pixel_ce * boundary).mean()

    with torch.no_grad():
        stats = {
            "mask_ratio": mask.float().mean(),
            "confident_ratio": parts["confident"].float().mean(),
            "fg_confident_ratio": parts["fg_confident"].float().mean(),
            "ring_ratio": parts["ring"].float().mean(),
            "boundary_ratio": parts["boundary"].float().mean(),
            # What SAE adds to FAE: boundary pixels that were not confident already.
            "sae_added_ratio": (parts["boundary"] & ~parts["confident"]).float().mean(),
        }
        if gt is not None:
            stats.update(pseudo_label_accuracy(labels, mask, gt, source_scores.shape[1] - 1))
    return loss, stats


@torch.no_grad()
def pseudo_label_accuracy(
    labels: torch.Tensor, mask: torch.Tensor, gt: torch.Tensor, num_classes: int
) -> dict[str, torch.Tensor]:
    """Accuracy of channel-space pseudo-labels against a label-space GT on masked, non-ignored pixels.

    Shape: labels long (B, H, W), mask bool (B, H, W), gt (B, H, W) -> {"pl_accuracy" float64,
    "pl_count" long}, 0-dim tensors (no host sync). The accuracy is NaN when no pixel counts.
    """
    if gt.shape != labels.shape:
        raise ValueError(f"gt must have the score-map shape {tuple(labels.shape)}, got {tuple(gt.shape)}")
    gt = gt.to(labels.device).long()
    counted = mask & (gt != IGNORE_INDEX)
    n = counted.sum()
    correct = ((channel_to_label(labels, num_classes) == gt) & counted).sum()
    # float64 division of two exact counts: the value Python's int / int gave; 0 / 0 = NaN
    return {"pl_accuracy": correct.double() / n.double(), "pl_count": n}
