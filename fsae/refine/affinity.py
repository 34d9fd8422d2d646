"""What IRN (``fsae.refine.irn``) and PSA (``fsae.refine.psa``) share: the pair set, the pair labels of a
label map, the affinity loss, the dense affinity matrix of the pairs (``dense_pair_matrix``), the transition
matrix and random walk, and the resumable training loop of an affinity network. Each method adds only where
its affinities come from (IRN: the class-boundary map; PSA: AffinityNet features) and which pairs it keeps.

Pairs (IRN ``PathIndex``, PSA ``get_indices_of_pairs``: the same offsets). A pixel ``p`` is paired with
``p + d`` for every offset ``d = (dy, dx)`` with ``0 < dy^2 + dx^2 < radius^2`` in one half plane
(``dy > 0``, or ``dy == 0`` and ``dx > 0``): each unordered pair appears once. Maps of pair values are
``(B, D, h, w)``: entry ``[b, k, y, x]`` belongs to the pair ``((y, x), (y + dy_k, x + dx_k))``;
``pair_valid`` marks the pairs whose second pixel lies in the map.

Path. The pixels "on the line" between ``p`` and ``p + d`` are the grid points of the bounding box of
``0`` and ``d`` whose distance to the line through ``0`` and ``d`` is below 1 (IRN's ``PathIndex``); both
ends are on the path. The directions are ordered by path length (IRN's order), so every pair map of
either method has the same ``D`` axis.

Walk. ``A`` (N, N) symmetric with ones on the diagonal; ``P = D^-1 A^beta`` row-stochastic (``A^beta``
element-wise); ``P^(2^n)`` by ``n`` squarings. IRN and PSA write ``T = A^beta D^-1`` (columns sum to 1)
and compute ``x T``; with ``A`` symmetric ``T = P^T`` and ``x T^n = (P^n x^T)^T``: the same numbers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from fsae.errors import CheckpointError
from fsae.labels import IGNORE_INDEX
from fsae.speed import grad_scaler, loader_options, optimizer_step
from fsae.train import save_checkpoint
from fsae.weights import read_weight_file

AFFINITY_EPS = 1e-5  # IRN / PSA: -log(a + 1e-5), -log(1 + 1e-5 - a), sums divided by (count + 1e-5)


# ------------------------------------------------------------------------------------------ pairs


def search_directions(radius: int) -> list[tuple[int, int]]:
    """Offsets ``(dy, dx)`` with ``0 < dy^2 + dx^2 < radius^2`` in the half plane ``dy > 0 or (dy == 0 and dx > 0)``,
    in IRN's order (row 0 first, then row by row, left to right)."""
    if radius < 2:
        raise ValueError(f"radius must be >= 2 (at least the 4 nearest neighbours), got {radius}")
    dirs = [(0, dx) for dx in range(1, radius)]
    dirs += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius) if dx * dx + dy * dy < radius**2]
    return dirs


def line_path(dy: int, dx: int) -> np.ndarray:
    """Grid points between ``(0, 0)`` and ``(dy, dx)``: (L, 2) int64, ``(dy, dx)`` first.

    The points of the bounding box whose squared distance to the line through ``0`` and ``(dy, dx)``,
    ``(dy x - dx y)^2 / (dy^2 + dx^2)``, is below 1; ordered by decreasing ``|y| + |x|``.
    """
    length_sq = dy * dy + dx * dx
    points = [
        (y, x)
        for y in range(min(0, dy), max(0, dy) + 1)
        for x in range(min(0, dx), max(0, dx) + 1)
        if (dy * x - dx * y) ** 2 / length_sq < 1
    ]
    points.sort(key=lambda p: -abs(p[0]) - abs(p[1]))
    return np.asarray(points, dtype=np.int64)


@dataclass(frozen=True)
class PairSet:
    """The pair directions of one radius, grouped by path length (one gather per group).

    ``directions`` (D, 2): offsets in the order of the ``D`` axis of every pair map;
    ``groups``: per path length ``L``, an array (n, L, 2) of the path points of ``n`` consecutive directions.
    """

    radius: int
    directions: np.ndarray
    groups: tuple[np.ndarray, ...]


@lru_cache(maxsize=None)
def pair_set(radius: int) -> PairSet:
    by_length: dict[int, list[np.ndarray]] = {}
    for d in search_directions(radius):
        path = line_path(*d)
        by_length.setdefault(len(path), []).append(path)
    groups = tuple(np.stack(by_length[n]) for n in sorted(by_length))
    directions = np.concatenate([g[:, 0] for g in groups])
    return PairSet(radius, directions, groups)


def gather_offsets(x: torch.Tensor, offsets: np.ndarray, fill: float) -> torch.Tensor:
    """``out[b, ..., y, x] = x[b, y + oy, x + ox]`` (``fill`` outside the map).

    Shape: x (B, h, w), offsets (..., 2) -> (B, ..., h, w).
    """
    b, h, w = x.shape
    pad = int(np.abs(offsets).max()) if offsets.size else 0
    padded = torch.nn.functional.pad(x, (pad, pad, pad, pad), value=fill)
    off = torch.as_tensor(offsets, device=x.device)
    ys = torch.arange(h, device=x.device).view(h, 1) + pad + off[..., 0, None, None]  # (..., h, 1)
    xs = torch.arange(w, device=x.device).view(1, w) + pad + off[..., 1, None, None]  # (..., 1, w)
    return padded[:, ys, xs]


def pair_valid(size: tuple[int, int], radius: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """True where the pair's second pixel lies inside an (h, w) map. Shape: (D, h, w) bool."""
    ones = torch.ones((1, *size), device=device)
    return gather_offsets(ones, pair_set(radius).directions, 0.0)[0] > 0


# ------------------------------------------------------------------------------- labels and loss


def affinity_labels(labels: torch.Tensor, radius: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pair labels from a label map (IRN Sec. 3.3, PSA Sec. 3.3): background-positive, foreground-positive,
    negative.

    Shape: labels (B, h, w) int, label space (255 ignore) -> three (B, D, h, w) float {0, 1} maps.
    A pair counts only when both pixels are inside the map and neither is ignored; it is positive when the
    two labels are equal (background-positive when that label is 0) and negative otherwise.
    """
    labels = labels.long()
    src = labels[:, None]
    dst = gather_offsets(labels, pair_set(radius).directions, IGNORE_INDEX)
    valid = (src != IGNORE_INDEX) & (dst != IGNORE_INDEX)
    equal = src == dst
    bg_pos = valid & equal & (src == 0)
    fg_pos = valid & equal & (src > 0)
    neg = valid & ~equal
    return bg_pos.float(), fg_pos.float(), neg.float()


def affinity_loss(
    affinity: torch.Tensor, bg_pos: torch.Tensor, fg_pos: torch.Tensor, neg: torch.Tensor
) -> dict[str, torch.Tensor]:
    """The affinity loss (IRN eq. 3-5; PSA train_aff.py:105-113): cross-entropy of the pair affinities
    against the pair labels.

    Shape: all (B, D, h, w) -> scalars ``bg_pos``, ``fg_pos``, ``neg`` and ``total``::

        L_bg  = sum(bg_pos * -log(a + eps))     / (sum(bg_pos) + eps)
        L_fg  = sum(fg_pos * -log(a + eps))     / (sum(fg_pos) + eps)
        L_neg = sum(neg    * -log(1 + eps - a)) / (sum(neg) + eps)
        total = (L_bg / 2 + L_fg / 2 + L_neg) / 2

    (IRN's training step without its displacement terms, eps = 1e-5.)
    """
    pos_term = -torch.log(affinity + AFFINITY_EPS)
    neg_term = -torch.log(1.0 + AFFINITY_EPS - affinity)
    bg = (bg_pos * pos_term).sum() / (bg_pos.sum() + AFFINITY_EPS)
    fg = (fg_pos * pos_term).sum() / (fg_pos.sum() + AFFINITY_EPS)
    ng = (neg * neg_term).sum() / (neg.sum() + AFFINITY_EPS)
    return {"bg_pos": bg, "fg_pos": fg, "neg": ng, "total": (bg / 2 + fg / 2 + ng) / 2}


# ----------------------------------------------------------------------------------------- walk


def dense_pair_matrix(pair_values: torch.Tensor, used: torch.Tensor, radius: int) -> torch.Tensor:
    """The (N, N) affinity matrix of the ``used`` pairs: symmetric, ones on the diagonal, zero elsewhere.

    Shape: pair_values (D, h, w), used (D, h, w) bool -> (h*w, h*w); pixels numbered row-major.
    """
    _, h, w = pair_values.shape
    device = pair_values.device
    directions = torch.as_tensor(pair_set(radius).directions, device=device)
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    src = (ys * w + xs).expand_as(used)  # (D, h, w)
    dst = src + (directions[:, 0] * w + directions[:, 1])[:, None, None]
    src, dst, values = src[used], dst[used], pair_values[used]
    dense = torch.eye(h * w, dtype=pair_values.dtype, device=device)
    dense[src, dst] = values
    dense[dst, src] = values
    return dense


def transition_matrix(affinity: torch.Tensor, beta: float) -> torch.Tensor:
    """Row-stochastic ``P = D^-1 A^beta``. Shape: (N, N) -> (N, N), rows sum to 1."""
    scaled = affinity.pow(beta)
    return scaled / scaled.sum(dim=1, keepdim=True)


def random_walk(values: torch.Tensor, transition: torch.Tensor, exp_times: int) -> torch.Tensor:
    """``P^(2^exp_times) v`` for each row ``v`` of ``values``, the power by repeated squaring.

    Shape: values (K, N), transition (N, N) -> (K, N).
    """
    power = transition
    for _ in range(exp_times):
        power = power @ power
    return values @ power.T


# ------------------------------------------------------------------------------------- training


def seed_loader_worker(worker_id: int) -> None:
    """A DataLoader worker's Python and numpy RNGs from its torch seed (the crops draw from them)."""
    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


def affinity_loader_options(tc, device) -> dict:
    """``fsae.speed.loader_options`` of IRN's and PSA's training ``train.*``, without persistent workers: the
    crops draw from Python's ``random``, which each epoch's new workers seed from the loader's generator
    (``seed_loader_worker``), the generator a resumed run restores; kept workers would go on with their own."""
    return loader_options(tc.workers, device, tc.prefetch, persistent=False)


def resume_affinity_net(checkpoint: Path, model, optimizer, scaler, generator: torch.Generator, cfg,
                        what: str) -> tuple[int, int]:
    """``(epoch, step)`` where training goes on: (0, 0) without ``checkpoint``; else its weights, optimizer,
    scaler and (unless it is complete) RNG states are restored. CheckpointError for another ``cfg.hash()``."""
    if not checkpoint.is_file():
        return 0, 0
    state = read_weight_file(checkpoint, f"{what} checkpoint", unwrap=False)
    if state.get("config_hash") != cfg.hash():
        raise CheckpointError(f"{checkpoint}: trained with other {what} settings (hash {state.get('config_hash')} "
                              f"!= {cfg.hash()}); delete it or use another run directory")
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])
    if state["epoch"] < cfg.train.epochs:
        random.setstate(state["py_random"])
        torch.set_rng_state(state["torch_random"])
        generator.set_state(state["loader_random"])
    return state["epoch"], state["step"]


def affinity_state(model, optimizer, scaler, generator: torch.Generator, cfg, epoch: int, step: int) -> dict:
    """The checkpoint after ``epoch`` finished epochs: weights, optimizer, (fp16) scaler, the step, the config
    and its hash, and the Python, torch and loader RNG states, so a killed run resumes to the same weights."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
            "step": step, "config_hash": cfg.hash(), "config": cfg.to_dict(),
            "py_random": random.getstate(), "torch_random": torch.get_rng_state(),
            "loader_random": generator.get_state(),
            **({"scaler": scaler.state_dict()} if scaler is not None else {})}


def fit_affinity_net(model, optimizer, loader, generator: torch.Generator, cfg, checkpoint: Path, step_fn,
                     device, progress: bool, what: str) -> Path:
    """The resumable training of an affinity network (IRN's boundary branch, PSA's AffinityNet): poly
    learning rate (``lr * group lr_mult * (1 - step / total) ** power``), ``step_fn(model, images, labels,
    radius, precision, channels_last) -> {"total", "neg", ...}`` under ``train.precision`` (a GradScaler for
    fp16) and ``train.channels_last``, ``checkpoint`` (``affinity_state``) written atomically after each
    epoch through ``fsae.train.save_checkpoint`` (equal states give equal bytes)."""
    tc = cfg.train
    total_steps = len(loader) * tc.epochs
    if tc.channels_last:
        model = model.to(memory_format=torch.channels_last)
    scaler = grad_scaler(tc.precision, torch.device(device))
    start_epoch, step = resume_affinity_net(checkpoint, model, optimizer, scaler, generator, cfg, what)
    if start_epoch >= tc.epochs:
        return checkpoint
    model.train()
    bar = tqdm(total=total_steps, initial=step, desc=f"{what.lower()} train", disable=not progress)
    for epoch in range(start_epoch, tc.epochs):
        for batch in loader:
            poly = (1 - step / total_steps) ** tc.poly_power
            for group in optimizer.param_groups:
                group["lr"] = tc.lr * group.get("lr_mult", 1.0) * poly
            terms = step_fn(model, batch["image"].to(device), batch["label"].to(device), tc.radius, tc.precision,
                            tc.channels_last)
            if not torch.isfinite(terms["total"]):
                raise FloatingPointError(f"{what} loss is {terms['total'].item()} at step {step} "
                                         f"(images {batch['id']})")
            optimizer_step(optimizer, scaler, terms["total"])
            step += 1
            bar.update()
            bar.set_postfix(loss=f"{terms['total'].item():.3f}", neg=f"{terms['neg'].item():.3f}")
        save_checkpoint(checkpoint, affinity_state(model, optimizer, scaler, generator, cfg, epoch + 1, step))
    bar.close()
    return checkpoint
