"""MCTformer V2 (Xu et al., CVPR 2022): a ViT with one class token per class, plus a patch-token CAM.

The transformer is timm's VisionTransformer (``deit_small_patch16_224`` in the recipe; any size by
``embed_dim`` / ``depth`` / ``num_heads`` for tests) run on ``[C class tokens, P patch tokens]``:

- the class tokens and their position embeddings are new parameters (truncated normal, std 0.02, or,
  with pretrained weights, the checkpoint's class token and its position repeated C times, as the
  base repo's fine-tuning does); the patch tokens get timm's patch position embedding, resampled (bicubic) when the patch grid
  differs from ``img_size / patch``; as in MCTformer V2 the final LayerNorm is not applied;
- class-token scores ``cls_logits_c = mean over channels of class token c`` (B, C);
- the V2 patch-token CAM head: a 3x3 conv from the patch tokens (B, D, h, w) to ``patch_cams``
  (B, C, h, w), scores ``patch_logits = GAP(patch_cams)``;
- losses: multi-label soft margin on both (``cls`` and ``patch``).

Inference (``cam``): with ``A_l`` the head-averaged softmax attention of layer l (B, N, N), N = C + P,
  ``mtatt = sum over the last attention_layers layers of A_l[:, :C, C:]`` (class-to-patch attention),
  ``fused = mtatt * ReLU(patch_cams)`` and, with ``patch_refine``, the patch-to-patch affinity
  ``R = sum over ALL layers of A_l[:, C:, C:]`` refines it: ``cam_c = R @ fused_c`` (B, C, h, w). The
  base repo's recipe: 3 layers, refinement on; its seeds are evaluated with a background threshold
  sweep, as here. Attention weights are recomputed from each block's own ``qkv`` (``attention_probs``)
  so timm's blocks run unchanged (fused attention included).

V2 has no background channel. FSAE's (C + 1)-channel score map is the plain CAM's:
``S = [patch_cams, b]`` with a fixed background logit ``b = background_logit`` (docs/decisions.md: SIPE's
background was tried too; a small ViT trained from scratch could not measure the choice).

Training recipe (the base repo's ``main.py``): AdamW, weight decay 0.05 except on biases, norms,
position embeddings and class tokens (timm's rule, ``param_groups``), drop path 0.1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fsae.errors import CheckpointError
from fsae.methods.base import Method, Output
from fsae.weights import read_weight_file, resolve_weights


def attention_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Head-averaged softmax attention of a timm ``Attention`` on its input x (B, N, D) -> (B, N, N)."""
    b, n, _ = x.shape
    qkv = attn.qkv(x).reshape(b, n, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    return ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1).mean(dim=1)


def attention_cams(attn: torch.Tensor, patch_cams: torch.Tensor, num_layers: int, refine: bool) -> torch.Tensor:
    """Attention-refined CAMs of MCTformer V2.

    Shape: attn (L, B, N, N) head-averaged, N = C + h*w; patch_cams (B, C, h, w) -> (B, C, h, w).
    ``fused = (sum of the last num_layers class-to-patch maps) * ReLU(patch_cams)``; with ``refine``,
    ``cam_c[i] = sum_j R[i, j] fused_c[j]`` with ``R`` the patch-to-patch attention summed over all layers.
    """
    b, c, h, w = patch_cams.shape
    class_to_patch = attn[-num_layers:].sum(0)[:, :c, c:].reshape(b, c, h, w)
    cams = class_to_patch * F.relu(patch_cams)
    if refine:
        affinity = attn.sum(0)[:, c:, c:]  # (B, P, P)
        cams = (cams.flatten(2) @ affinity.transpose(1, 2)).reshape(b, c, h, w)
    return cams


def vit_state_dict(state: dict, model: nn.Module, grid: tuple[int, int], where: str) -> dict:
    """A DeiT / ViT checkpoint mapped onto the class-token-free ViT: drop the head and the single class
    token (and its position), resample the patch position grid."""
    from timm.layers import resample_abs_pos_embed

    for key in ("model", "state_dict"):
        if key in state and isinstance(state[key], dict):
            state = state[key]
    own = model.state_dict()
    out = {k: v for k, v in state.items() if k in own and not k.startswith("head")}
    if "pos_embed" in state:
        pos = state["pos_embed"]
        side = int(round((pos.shape[1] - 1) ** 0.5))
        prefix = 1 if side * side == pos.shape[1] - 1 else 0  # a class token's position comes first
        pos = pos[:, prefix:]
        old = int(round(pos.shape[1] ** 0.5))
        out["pos_embed"] = resample_abs_pos_embed(pos, list(grid), [old, old], num_prefix_tokens=0)
    missing = [k for k in own if k not in out]
    if missing:
        raise CheckpointError(f"{where}: missing ViT weights, e.g. {missing[:5]} ({len(missing)} in all)")
    return out


class MCTformerV2(Method):
    def __init__(self, num_classes: int, backbone: str = "deit_small_patch16_224", weights: str | None = None,
                 img_size: int = 224, embed_dim: int | None = None, depth: int | None = None,
                 num_heads: int | None = None, drop_path: float = 0.1, attention_layers: int = 3,
                 patch_refine: bool = True, background_logit: float = 5.0):
        super().__init__()
        import timm

        self.num_classes = num_classes
        self.attention_layers = attention_layers
        self.patch_refine = patch_refine
        self.background_logit = background_logit
        size = {k: v for k, v in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)) if v}
        self.vit = timm.create_model(backbone, pretrained=False, num_classes=0, global_pool="", class_token=False,
                                     img_size=img_size, drop_path_rate=drop_path, **size)
        self.vit.norm = nn.Identity()  # MCTformer V2 uses the last block's tokens without the final norm
        self.grid = tuple(self.vit.patch_embed.grid_size)
        if attention_layers < 1 or attention_layers > len(self.vit.blocks):
            raise ValueError(f"mct.attention_layers must be in 1..{len(self.vit.blocks)}, got {attention_layers}")
        dim = self.vit.embed_dim
        self.class_tokens = nn.Parameter(torch.zeros(1, num_classes, dim))
        self.class_pos = nn.Parameter(torch.zeros(1, num_classes, dim))
        nn.init.trunc_normal_(self.class_tokens, std=0.02)
        nn.init.trunc_normal_(self.class_pos, std=0.02)
        self.head = nn.Conv2d(dim, num_classes, 3, padding=1)  # V2's patch-token CAM head
        if weights:
            self._load_weights(backbone, weights)

    @classmethod
    def from_config(cls, model_cfg, num_classes: int) -> "MCTformerV2":
        m = model_cfg.mct
        return cls(num_classes, backbone=model_cfg.backbone, weights=model_cfg.weights, img_size=m.img_size,
                   embed_dim=m.embed_dim, depth=m.depth, num_heads=m.num_heads, drop_path=m.drop_path,
                   attention_layers=m.attention_layers, patch_refine=m.patch_refine,
                   background_logit=model_cfg.background_logit)

    def _load_weights(self, backbone: str, weights: str) -> None:
        import timm

        if weights == "timm":
            state, where = timm.create_model(backbone, pretrained=True).state_dict(), f"timm:{backbone}"
        else:
            weights = resolve_weights(weights, backbone)  # "imagenet": DeiT's file (fsae.weights.DEIT_SMALL)
            state, where = read_weight_file(weights, "ViT weight", unwrap=False), weights
        self.vit.load_state_dict(vit_state_dict(state, self.vit, self.grid, where), strict=False)
        state = state.get("model", state.get("state_dict", state))
        with torch.no_grad():  # the single class token (and its position) repeated for every class
            if "cls_token" in state:
                self.class_tokens.copy_(state["cls_token"].reshape(1, 1, -1).expand_as(self.class_tokens))
            pos = state.get("pos_embed")
            if pos is not None and int(round((pos.shape[1] - 1) ** 0.5)) ** 2 == pos.shape[1] - 1:
                self.class_pos.copy_(pos[:, :1].expand_as(self.class_pos))

    def _encode(self, images: torch.Tensor, with_attention: bool = False):
        """-> tokens (B, C+P, D), patch grid (h, w), attention (L, B, N, N) or None."""
        from timm.layers import resample_abs_pos_embed

        x = self.vit.patch_embed.proj(images)  # (B, D, h, w); a partial last patch is dropped
        grid = tuple(x.shape[-2:])
        x = self.vit.patch_embed.norm(x.flatten(2).transpose(1, 2))
        pos = self.vit.pos_embed
        if grid != self.grid:
            pos = resample_abs_pos_embed(pos, list(grid), list(self.grid), num_prefix_tokens=0)
        cls = self.class_tokens.expand(x.shape[0], -1, -1) + self.class_pos
        x = self.vit.norm_pre(self.vit.pos_drop(torch.cat([cls, x + pos], dim=1)))
        attn = []
        for blk in self.vit.blocks:
            if with_attention:
                attn.append(attention_probs(blk.attn, blk.norm1(x)))
            x = blk(x)
        return x, grid, (torch.stack(attn) if with_attention else None)

    def _patch_cams(self, tokens: torch.Tensor, grid) -> torch.Tensor:
        patches = tokens[:, self.num_classes:].transpose(1, 2).reshape(tokens.shape[0], -1, *grid)
        return self.head(patches)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> Output:
        tokens, grid, _ = self._encode(images)
        cls_logits = tokens[:, :self.num_classes].mean(-1)  # class token c -> score c
        patch_cams = self._patch_cams(tokens, grid)  # (B, C, h, w)
        score_map = torch.cat([patch_cams, torch.full_like(patch_cams[:, :1], self.background_logit)], 1)
        return Output(logits=cls_logits, score_map=score_map,
                      extras={"patch_logits": patch_cams.mean(dim=(2, 3)), "patch_cams": patch_cams})

    def losses(self, batch: dict, output: Output) -> dict[str, torch.Tensor]:
        labels = batch["label"].to(output.logits)
        return {"cls": F.multilabel_soft_margin_loss(output.logits, labels),
                "patch": F.multilabel_soft_margin_loss(output.extras["patch_logits"], labels)}

    @torch.no_grad()
    def cam(self, images: torch.Tensor) -> torch.Tensor:
        tokens, grid, attn = self._encode(images, with_attention=True)
        return attention_cams(attn, self._patch_cams(tokens, grid), self.attention_layers, self.patch_refine)

    def param_groups(self) -> list[dict]:
        """timm's weight-decay rule: none on biases, norms (1-D), position embeddings and class tokens."""
        groups = {(new, decay): [] for new in (False, True) for decay in (False, True)}
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            new = name.startswith(("head", "class_"))
            decay = p.ndim > 1 and not name.endswith("pos_embed") and not name.startswith("class_")
            groups[(new, decay)].append(p)
        return [{"params": ps, "new": new, **({} if decay else {"weight_decay": 0.0})}
                for (new, decay), ps in groups.items() if ps]
