"""Dense-head outputs in a form distillers can use without knowing mmdet's head classes
(:class:`methods._base.HeadOutputs`, built here from a head's raw outputs).

For every prediction (anchor or point) of a one-stage head, or of a two-stage detector's
RPN: class logits N x P x C, raw regressions N x P x R, the priors P x 4 (anchors) or
P x 2 (points), decoded boxes N x P x 4 in input pixels, and the positive IoU threshold
of the detector's own assigner. Levels are concatenated in mmdet's order (level, then
row, column, anchor), so prediction p of the teacher and of the student correspond
when the two heads share a prior layout.
"""
from __future__ import annotations

from typing import Any

import torch

from methods._base import HeadOutputs


def dense_head(detector: Any) -> Any:
    """The head whose outputs GID-style distillers use: the RPN of a two-stage detector,
    else the detector's dense bbox head."""
    return detector.rpn_head if getattr(detector, "with_rpn", False) else detector.bbox_head


def _flatten(maps: list[torch.Tensor], per_prior: int) -> torch.Tensor:
    n = maps[0].shape[0]
    return torch.cat([m.permute(0, 2, 3, 1).reshape(n, -1, per_prior) for m in maps], dim=1)


def head_outputs(detector: Any, raw: tuple[Any, ...], pad_hw: tuple[int, int] | None = None) -> HeadOutputs:
    """Turn a head's ``forward`` output into :class:`HeadOutputs`."""
    head = dense_head(detector)
    cls_maps, reg_maps = list(raw[0]), list(raw[1])
    sizes = [m.shape[-2:] for m in cls_maps]
    device = cls_maps[0].device
    priors = torch.cat(head.prior_generator.grid_priors(sizes, device=device), dim=0)
    c = head.cls_out_channels
    cls = _flatten(cls_maps, c)
    reg_dim = reg_maps[0].shape[1] // head.prior_generator.num_base_priors[0]
    reg = _flatten(reg_maps, reg_dim)
    n = cls.shape[0]
    points_only = priors.shape[1] == 2
    if points_only:
        # FCOS-style (l, t, r, b) distances. With norm_on_bbox mmdet's head returns them in
        # units of the level's stride while training and in pixels in eval mode (the
        # frozen teacher): `reg` is put in stride units for both, `boxes` in pixels.
        strides = torch.cat([torch.full((s[0] * s[1],), float(st[0]), device=device)
                             for s, st in zip(sizes, head.prior_generator.strides)])[None, :, None]
        if getattr(head, "norm_on_bbox", False):
            dist = reg * strides if head.training else reg
            reg = reg if head.training else reg / strides
        else:
            dist = reg
        p = priors[None]
        boxes = torch.cat([p - dist[..., :2], p + dist[..., 2:]], dim=-1)
    else:
        # flattened to (N*P) x 4: mmdet's batched (N x P x 4) decoding is a deprecated slow path
        boxes = head.bbox_coder.decode(priors.repeat(n, 1), reg.detach().reshape(-1, reg.shape[-1])).reshape(n, -1, 4)
    assigner = getattr(getattr(head, "train_cfg", None) or {}, "get", lambda *_: None)("assigner")
    assigner = assigner or {}
    return HeadOutputs(cls=cls, reg=reg, priors=priors, boxes=boxes.detach(), points_only=points_only,
                       pos_iou=float(assigner.get("pos_iou_thr", 0.5)),
                       low_quality=bool(assigner.get("match_low_quality", True)),
                       min_pos_iou=float(assigner.get("min_pos_iou", 0.0)))
