"""GID: selection on constructed predictions and each loss term against hand computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods.gid import (anchor_mask, box_iou_batched, feature_loss, gi_scores, point_mask, pool_instances,
                         relation_loss, response_losses, roi_levels, select_general_instances)


def test_gi_score_paper_and_variant():
    t = torch.tensor([[[0.0, 2.0]]])          # sigmoid: 0.5, 0.881
    s = torch.tensor([[[1.0, 2.0]]])          # sigmoid: 0.731, 0.881
    assert gi_scores(t, s).item() == pytest.approx(1 / (1 + math.exp(-1)) - 0.5)
    assert gi_scores(t, s, "max_logit").item() == pytest.approx(0.0)
    with pytest.raises(ValueError, match="paper, max_logit"):
        gi_scores(t, s, "bogus")


def _boxes(*bs):
    return torch.tensor(bs, dtype=torch.float32)


def test_selection_picks_planted_disagreements_and_suppresses_overlaps():
    # image 0: predictions 0 and 1 overlap heavily (IoU 0.81), 2 is apart, 3 is tiny, 4 agrees
    b = _boxes([0, 0, 10, 10], [0, 0, 10, 9], [20, 20, 40, 40], [50, 50, 51, 51], [60, 0, 80, 20])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.95, 0.01]])
    conf_t, conf_s = torch.ones(1, 5), torch.zeros(1, 5)        # teacher more confident: its boxes
    boxes, valid, sc = select_general_instances(scores, b[None], b[None] + 100, conf_t, conf_s,
                                                min_size=2, nms_iou=0.3, k=3)
    assert valid.tolist() == [[True, True, True]]
    assert torch.equal(boxes[0, 0], b[0]) and torch.equal(boxes[0, 1], b[2]) and torch.equal(boxes[0, 2], b[4])
    assert sc[0].tolist() == pytest.approx([0.9, 0.7, 0.01])


def test_selection_uses_the_more_confident_models_box_and_top_k_per_image():
    bt = _boxes([0, 0, 10, 10], [20, 0, 30, 10], [40, 0, 50, 10])
    bs = bt + 1
    scores = torch.tensor([[0.5, 0.6, 0.7], [0.3, 0.2, 0.1]])
    conf_t = torch.tensor([[0.9, 0.1, 0.9], [0.1, 0.1, 0.1]])
    conf_s = torch.tensor([[0.1, 0.9, 0.1], [0.9, 0.9, 0.9]])
    boxes, valid, sc = select_general_instances(scores, bt[None].repeat(2, 1, 1), bs[None].repeat(2, 1, 1),
                                                conf_t, conf_s, k=2, min_size=2)
    assert valid.all()
    assert torch.equal(boxes[0, 0], bt[2]) and torch.equal(boxes[0, 1], bs[1])   # 0.7 teacher, 0.6 student
    assert torch.equal(boxes[1, 0], bs[0]) and torch.equal(boxes[1, 1], bs[1])   # image 1: student boxes
    assert torch.allclose(sc, torch.tensor([[0.7, 0.6], [0.3, 0.2]]))


def test_selection_with_fewer_instances_than_k():
    b = _boxes([0, 0, 10, 10])
    boxes, valid, _ = select_general_instances(torch.tensor([[0.5]]), b[None], b[None], torch.ones(1, 1),
                                               torch.zeros(1, 1), k=4, min_size=2)
    assert valid.tolist() == [[True, False, False, False]]


def test_roi_levels():
    b = _boxes([0, 0, 56, 56], [0, 0, 111, 111], [0, 0, 112, 112], [0, 0, 10, 10], [0, 0, 2000, 2000])
    assert roi_levels(b, 4).tolist() == [0, 0, 1, 0, 3]


def test_pool_instances_picks_level_and_region():
    f0 = torch.arange(64, dtype=torch.float32).reshape(1, 1, 8, 8)       # stride 4
    f1 = torch.full((1, 1, 16, 16), 7.0)                                 # stride 8
    boxes = _boxes([[0, 0, 8, 8], [0, 0, 120, 120]])
    pooled = pool_instances([f0, f1], [4, 8], boxes, torch.tensor([[True, True]]), 1)
    # box 0 -> level 0, the 2x2 cells (0..1, 0..1) averaged by bilinear sampling: centre at (1, 1) - 0.5
    assert pooled[0].item() == pytest.approx((0 + 1 + 8 + 9) / 4)
    assert pooled[1].item() == pytest.approx(7.0)                         # level 1, constant map


def test_feature_loss_by_hand():
    s = torch.zeros(2, 1, 2, 2)
    t = torch.ones(2, 1, 2, 2)
    t[1] *= 2
    # sum of squares: 4 * 1 + 4 * 4 = 20, over K=2 instances of S^2=4 cells
    assert feature_loss(s, t).item() == pytest.approx(20 / (2 * 4))


def test_relation_loss_by_hand():
    # three instances in 1-d: teacher at 0, 1, 2 -> distances 1, 2, 1 (x2), mean 4/3
    t = torch.tensor([0.0, 1.0, 2.0]).reshape(3, 1, 1, 1)
    s = torch.tensor([0.0, 1.0, 3.0]).reshape(3, 1, 1, 1)    # distances 1, 3, 2, mean 2
    valid = torch.tensor([[True, True, True]])
    dt = torch.tensor([1, 2, 1]) / (4 / 3)
    ds = torch.tensor([1, 3, 2]) / 2.0
    expected = F.smooth_l1_loss(ds, dt, reduction="mean").item()    # the matrix is symmetric
    assert relation_loss(s, t, valid).item() == pytest.approx(expected, rel=1e-5)


def test_relation_loss_is_scale_invariant_and_skips_small_images():
    g = torch.Generator().manual_seed(0)
    t = torch.randn(5, 2, 2, 2, generator=g)
    valid = torch.tensor([[True, True, True, False], [True, True, False, False]])
    assert relation_loss(3 * t, t, valid).item() == pytest.approx(0.0, abs=1e-6)
    assert relation_loss(t[:2] * 0 + 1, t[:2], torch.tensor([[True, True, False]])).item() == 0.0


def test_box_iou_and_masks():
    anchors = _boxes([0, 0, 10, 10], [0, 0, 10, 20], [30, 30, 40, 40])
    gi = _boxes([[0, 0, 10, 10], [100, 100, 110, 110]])
    iou = box_iou_batched(anchors, gi)
    assert iou[0, :, 0].tolist() == pytest.approx([1.0, 0.5, 0.0])
    assert anchor_mask(anchors, gi, torch.tensor([[True, True]]), low_quality=False).tolist() == [[True, True, False]]
    assert anchor_mask(anchors, gi, torch.tensor([[False, True]]), low_quality=False).tolist() == [[False, False, False]]
    # low-quality matches: each GI's best anchors (ties included) are positive too
    near = _boxes([[0, 0, 10, 12]])                        # IoU 10/12 and 12/20 with anchors 0 and 1
    assert anchor_mask(anchors, near, torch.tensor([[True]]), pos_iou=0.9, low_quality=False).tolist() == \
        [[False, False, False]]
    assert anchor_mask(anchors, near, torch.tensor([[True]]), pos_iou=0.9).tolist() == [[True, False, False]]
    assert anchor_mask(anchors, near, torch.tensor([[True]]), pos_iou=0.9, min_pos_iou=0.9).tolist() == \
        [[False, False, False]]
    points = torch.tensor([[5.0, 5.0], [35.0, 35.0], [105.0, 105.0]])
    assert point_mask(points, gi, torch.tensor([[True, True]])).tolist() == [[True, False, True]]


def test_response_losses_by_hand():
    cls_s = torch.tensor([[[0.0], [5.0]]])
    cls_t = torch.tensor([[[math.log(3.0)], [0.0]]])            # sigmoid(ln 3) = 0.75
    reg_s = torch.tensor([[[0.0, 0.0], [9.0, 9.0]]])
    reg_t = torch.tensor([[[0.5, 2.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, False]])
    out = response_losses(cls_s, cls_t, reg_s, reg_t, mask, reg_beta=1.0)
    # BCE(logit 0, target 0.75) = -(0.75 ln 0.5 + 0.25 ln 0.5) = ln 2
    assert out["cls"].item() == pytest.approx(math.log(2.0))
    # smooth L1 (beta 1): 0.5 * 0.5^2 + (2 - 0.5) = 0.125 + 1.5
    assert out["reg"].item() == pytest.approx(1.625)
    # the reproduction's beta 0.1: both differences are linear, |d| - 0.05
    assert response_losses(cls_s, cls_t, reg_s, reg_t, mask)["reg"].item() == pytest.approx(0.45 + 1.95)
