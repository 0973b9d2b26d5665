"""Global knowledge with prototypes: PGM's density filter and joint matching pursuit,
RDM's weights and losses against hand computations."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from methods.gkp import (crop_descriptors, decay, density, density_filter, global_alignment_loss, instance_mask,
                         joint_matching_pursuit, pursuit_coefficients, released_levels, robustness_weights,
                         roi_soft_label_loss, weighted_feature_loss)


def test_density_by_hand():
    x = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]), dim=1)
    rho = density(x)
    # identical pair: exp(0) twice; orthogonal: exp(-(1/0.1)^2) ~ 0
    assert rho.tolist() == pytest.approx([2.0, 2.0, 1.0], abs=1e-6)


def test_density_filter_drops_outliers_in_either_space():
    g = torch.Generator().manual_seed(0)
    centre = torch.randn(1, 8, generator=g)
    a = F.normalize(centre + 0.02 * torch.randn(10, 8, generator=g), dim=1)
    b = a.clone()
    a[3] = F.normalize(torch.randn(8, generator=g), dim=0)          # outlier in space a only
    b[7] = F.normalize(torch.randn(8, generator=g), dim=0)          # outlier in space b only
    keep = density_filter(a, b)
    assert not keep[3] and not keep[7]
    assert keep.sum() >= 4


def test_pursuit_coefficients_minimise_the_coupled_cost():
    alpha = 10.0
    ca, cb = torch.tensor(0.8), torch.tensor(0.2)
    wa, wb = pursuit_coefficients(ca, cb, alpha)
    assert wa.item() == pytest.approx((alpha * 1.0 + 0.8) / 21)
    # the gradient of w^2 - 2 c w (per space) + alpha (wa - wb)^2 vanishes there
    assert (2 * wa - 2 * ca + 2 * alpha * (wa - wb)).item() == pytest.approx(0.0, abs=1e-6)
    assert (2 * wb - 2 * cb - 2 * alpha * (wa - wb)).item() == pytest.approx(0.0, abs=1e-6)


def test_matching_pursuit_recovers_planted_shared_prototypes():
    g = torch.Generator().manual_seed(1)
    d_a, d_b, k = 16, 12, 3
    protos_a = F.normalize(torch.randn(k, d_a, generator=g), dim=1)
    protos_b = F.normalize(torch.randn(k, d_b, generator=g), dim=1)
    # 30 noisy instances around the planted prototypes, each with the same owner in both
    # spaces (the shared index is what the pursuit must find); the noise-free prototypes
    # are among the candidates and explain their clusters best
    owner = torch.arange(30) % k
    inst_a = F.normalize(protos_a[owner] + 0.1 * torch.randn(30, d_a, generator=g), dim=1)
    inst_b = F.normalize(protos_b[owner] + 0.1 * torch.randn(30, d_b, generator=g), dim=1)
    a = torch.cat([inst_a, protos_a])          # candidates 30, 31, 32 are the planted prototypes
    b = torch.cat([inst_b, protos_b])
    picks = joint_matching_pursuit(a, b, m=3, alpha=10.0)
    assert sorted(picks.tolist()) == [30, 31, 32]


def test_matching_pursuit_needs_both_spaces():
    """A candidate that is a perfect prototype in one space only is not picked first."""
    a = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.05], [0.0, 1.0]]), dim=1)
    b = F.normalize(torch.tensor([[0.0, 1.0], [1.0, 0.05], [1.0, 0.0]]), dim=1)
    assert joint_matching_pursuit(a, b, m=1).tolist() == [1]


def test_robustness_weight_is_one_for_identical_spaces_and_falls_as_they_diverge():
    g = torch.Generator().manual_seed(2)
    protos = torch.randn(4, 6, generator=g)
    cls = torch.tensor([0, 0, 1, 1])
    f = torch.randn(5, 6, generator=g)
    labels = torch.tensor([0, 1, 0, 1, 0])
    assert torch.allclose(robustness_weights(f, f, protos, protos, cls, labels), torch.ones(5))
    previous = torch.ones(5)
    for noise in (0.3, 1.0, 3.0):
        w = robustness_weights(f + noise * torch.randn(5, 6, generator=g), f, protos, protos, cls, labels)
        assert (w <= 1).all() and w.mean() < previous.mean()
        previous = w


def test_robustness_weight_by_hand_and_missing_class():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    cls = torch.tensor([0, 1])
    fs = torch.tensor([[1.0, 1.0], [1.0, 0.0]])      # cos to class-0 prototype: 1/sqrt(2)
    ft = torch.tensor([[1.0, 0.0], [1.0, 0.0]])      # cos 1
    w = robustness_weights(fs, ft, protos, protos, cls, torch.tensor([0, 5]))
    assert w.tolist() == pytest.approx([1 - (1 - 1 / math.sqrt(2)), 0.0])


def test_global_alignment_loss_by_hand():
    protos = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    fs = torch.tensor([[1.0, 0.0]])                  # cos (1, 0)
    ft = torch.tensor([[0.0, 1.0]])                  # cos (0, 1)
    # smooth L1 of differences 1 and 1 (beta 1): 0.5 each
    assert global_alignment_loss(fs, ft, protos, protos, torch.tensor([0.5])).item() == pytest.approx(0.5)


def test_weighted_feature_loss_by_hand():
    fs = torch.zeros(1, 1, 1, 3)
    ft = torch.tensor([[[[1.0, 2.0, 3.0]]]])
    fg = torch.tensor([[[0.5, 0.0, 0.0]]])
    out = weighted_feature_loss(fs, ft, fg)
    assert out["fg"].item() == pytest.approx(0.5 * 1 / max(1.0, 2 * 0.5))
    assert out["bg"].item() == pytest.approx(4 * (4 + 9) / (2 * 2))
    # two channels: the squared error doubles and so does the normaliser 2 C sum(M)
    fs2, ft2 = torch.zeros(1, 2, 1, 3), torch.cat([ft, ft], dim=1)
    fg2 = torch.tensor([[[2.0, 0.0, 0.0]]])
    out2 = weighted_feature_loss(fs2, ft2, fg2)
    assert out2["fg"].item() == pytest.approx(2.0 * 2 * 1 / (2 * 2 * 2.0))
    assert out2["bg"].item() == pytest.approx(4 * 2 * (4 + 9) / (2 * 2 * 2))


def test_instance_mask_later_instance_overwrites_and_one_cell_boxes_keep_the_max():
    # stride 8 on a 4x4 map: box 0 covers cells 0..1 (x 0..16 -> int 0 .. int 2, exclusive)
    boxes = torch.tensor([[[0.0, 0.0, 16.0, 16.0], [0.0, 0.0, 8.0, 8.0], [17.0, 17.0, 20.0, 20.0]]])
    on = torch.tensor([[True, True, True]])
    mask = instance_mask(boxes, on, torch.tensor([[0.3, 0.9, 0.7]]), 4, 4, 8)
    assert mask[0, 0, 0].item() == pytest.approx(0.9)      # box 1 set its one block after box 0
    assert mask[0, 1, 1].item() == pytest.approx(0.3)      # box 0 only
    assert mask[0, 2, 2].item() == pytest.approx(0.7)      # box 2 lies within cell (2, 2): one cell
    assert mask[0, 3, 3].item() == 0
    swapped = instance_mask(boxes[:, [1, 0, 2]], on, torch.tensor([[0.9, 0.3, 0.7]]), 4, 4, 8)
    assert swapped[0, 0, 0].item() == pytest.approx(0.3)   # order matters: the later box overwrites
    off = instance_mask(boxes, torch.tensor([[True, False, True]]), torch.tensor([[0.3, 0.9, 0.7]]), 4, 4, 8)
    assert off[0, 0, 0].item() == pytest.approx(0.3)       # an instance of another level is not drawn


def test_released_levels_and_crop_descriptors_by_hand():
    boxes = torch.tensor([[0.0, 0.0, 55.0, 55.0], [0.0, 0.0, 111.0, 111.0], [0.0, 0.0, 1000.0, 1000.0]])
    assert released_levels(boxes, 5).tolist() == [0, 1, 4]       # sqrt((w+1)(h+1)) / 56: 1, 2, 17.9
    feat = torch.arange(16.0).reshape(1, 1, 4, 4)
    # stride 8: box (8, 0, 17, 9) -> rows 0..1, cols 1..2 (inclusive) -> cells 1, 2, 5, 6
    d = crop_descriptors(feat, torch.tensor([[8.0, 0.0, 17.0, 9.0]]), torch.tensor([0]), 8)
    assert d.item() == pytest.approx((1 + 2 + 5 + 6) / 4)


def test_roi_soft_label_loss_by_hand():
    zs = torch.tensor([[0.0, 0.0]])
    zt = torch.tensor([[2 * math.log(3.0), 0.0]])           # softmax(zt / 2) = (0.75, 0.25)
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    # T^2 x the KL's terms averaged over the 2 classes, x the weight, averaged over RoIs
    assert roi_soft_label_loss(zs, zt, torch.tensor([0.5])).item() == pytest.approx(4 * 0.5 * kl / 2)


def test_decay():
    assert [decay(e, 4) for e in range(4)] == [1.0, 0.75, 0.5, 0.25]


def test_a_level_without_prototypes_weighs_its_instances_zero():
    """PGM found no instance large enough on a level (a small dataset's fine levels): the
    level's prototypes are empty and its instances get w = 0, as a class without
    prototypes does (it raised IndexError: amax() over an empty dimension)."""
    f = torch.randn(3, 4)
    w = robustness_weights(f, f, torch.zeros(0, 4), torch.zeros(0, 4), torch.zeros(0, dtype=torch.long),
                           torch.tensor([0, 1, 2]))
    assert w.tolist() == [0.0, 0.0, 0.0]


def _gkp_model(arch, det_batch):
    from .test_distillers import _distilled
    return _distilled("gkp", arch, det_batch)[0]


def test_gkp_trains_when_a_level_has_instances_but_no_prototypes(det_batch):
    """The whole distiller, a one-stage and a two-stage student: one level's prototypes
    empty (as PGM leaves a level whose boxes were all below its minimum), the others
    kept: the losses are finite."""
    from .test_distillers import _losses
    for arch in ("retinanet", "faster_rcnn"):
        model = _gkp_model(arch, det_batch)
        protos = model.distiller.prototypes
        assert any(len(c) for _, _, c in protos)
        s, t, c = protos[0]
        protos[0] = (s[:0], t[:0], c[:0])
        losses = _losses(model, det_batch)
        gkp = {k: v for k, v in losses.items() if k.startswith("loss_gkp_")}
        assert gkp and all(torch.isfinite(v) for v in gkp.values()), gkp


def test_gkp_roi_weights_under_autocast(det_batch):
    """Mixed precision: under autocast the RoI robustness weights come out in the autocast
    dtype (its matmul) while their destination takes the pooled features' (float32): they
    are written in the destination's dtype (a dtype mismatch raised before). The batch is
    a two-stage student's, as the trial hands it to the distiller (mmcv's CPU NMS has no
    bf16, so the detector's own forward runs outside autocast here)."""
    from .test_distillers import _losses
    model = _gkp_model("faster_rcnn", det_batch)
    batches = []
    forward = type(model.distiller).forward

    def keep(self, batch):
        batches.append(batch)
        return forward(self, batch)
    type(model.distiller).forward = keep
    try:
        _losses(model, det_batch)
    finally:
        type(model.distiller).forward = forward
    batch = batches[-1]
    assert batch.rois is not None and batch.student_feats[0].dtype == torch.float32
    plain = model.distiller._roi_weights(batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = model.distiller._roi_weights(batch)
        loss = model.distiller(batch)["loss_gkp_roi_kd"]
    assert plain.numel() and (plain > 0).any() and mixed.dtype == plain.dtype
    assert torch.allclose(mixed, plain, atol=0.02) and torch.isfinite(loss)
