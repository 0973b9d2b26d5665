"""Fidelity: each distiller's loss terms against a transcription of the released code.

Every reference below is a transcription, written for this test, of the released
function named in its docstring (repository, file, function), kept as close to the
original as a CPU test allows: the same loops, the same reductions, mmcv / detectron2
operators replaced by their torch / torchvision equivalents. The harness's batched
implementation must give the same numbers on the same random inputs and fixed boxes,
at the released scale (the defaults of the registry), to 1e-5 relative.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import nms, roi_align

from harness import catalog
from harness.tasks.det.dense import HeadOutputs
from methods._base import DetBatch, ModelInfo, RoIBatch

REL = 1e-5


def _close(got: torch.Tensor | float, want: torch.Tensor | float) -> None:
    got, want = float(torch.as_tensor(got).detach()), float(torch.as_tensor(want).detach())
    assert got == pytest.approx(want, rel=REL, abs=1e-9), (got, want)


def _defaults(method: str, family: str, **over) -> dict:
    return catalog.method_params(method, family, over)


# ================================================================================ FGD
class ReleasedFGDFeatureLoss(torch.nn.Module):
    """Transcription of yzd-v/FGD ``mmdet/distillation/losses/fgd.py``, ``FeatureLoss.forward``
    with ``get_attention``, ``get_fea_loss``, ``get_mask_loss``, ``spatial_pool`` and
    ``get_rela_loss`` (one FPN level; the mask built box by box as released)."""

    def __init__(self, gc_s, gc_t, temp, alpha, beta, gamma, lam, align=None):
        super().__init__()
        self.temp, self.alpha_fgd, self.beta_fgd, self.gamma_fgd, self.lambda_fgd = temp, alpha, beta, gamma, lam
        self.align = align
        self.conv_mask_s, self.conv_mask_t = gc_s.conv_mask, gc_t.conv_mask
        self.channel_add_conv_s, self.channel_add_conv_t = gc_s.channel_add, gc_t.channel_add

    def forward(self, preds_S, preds_T, gt_bboxes, img_metas):
        if self.align is not None:
            preds_S = self.align(preds_S)
        N, C, H, W = preds_S.shape
        S_attention_t, C_attention_t = self.get_attention(preds_T, self.temp)
        S_attention_s, C_attention_s = self.get_attention(preds_S, self.temp)
        Mask_fg = torch.zeros_like(S_attention_t)
        Mask_bg = torch.ones_like(S_attention_t)
        wmin, wmax, hmin, hmax = [], [], [], []
        for i in range(N):
            new_boxxes = torch.ones_like(gt_bboxes[i])
            new_boxxes[:, 0] = gt_bboxes[i][:, 0] / img_metas[i]['img_shape'][1] * W
            new_boxxes[:, 2] = gt_bboxes[i][:, 2] / img_metas[i]['img_shape'][1] * W
            new_boxxes[:, 1] = gt_bboxes[i][:, 1] / img_metas[i]['img_shape'][0] * H
            new_boxxes[:, 3] = gt_bboxes[i][:, 3] / img_metas[i]['img_shape'][0] * H
            wmin.append(torch.floor(new_boxxes[:, 0]).int())
            wmax.append(torch.ceil(new_boxxes[:, 2]).int())
            hmin.append(torch.floor(new_boxxes[:, 1]).int())
            hmax.append(torch.ceil(new_boxxes[:, 3]).int())
            area = 1.0 / (hmax[i].view(1, -1) + 1 - hmin[i].view(1, -1)) / (wmax[i].view(1, -1) + 1 - wmin[i].view(1, -1))
            for j in range(len(gt_bboxes[i])):
                Mask_fg[i][hmin[i][j]:hmax[i][j] + 1, wmin[i][j]:wmax[i][j] + 1] = \
                    torch.maximum(Mask_fg[i][hmin[i][j]:hmax[i][j] + 1, wmin[i][j]:wmax[i][j] + 1], area[0][j])
            Mask_bg[i] = torch.where(Mask_fg[i] > 0, 0, 1)
            if torch.sum(Mask_bg[i]):
                Mask_bg[i] /= torch.sum(Mask_bg[i])
        fg_loss, bg_loss = self.get_fea_loss(preds_S, preds_T, Mask_fg, Mask_bg,
                                             C_attention_s, C_attention_t, S_attention_s, S_attention_t)
        mask_loss = self.get_mask_loss(C_attention_s, C_attention_t, S_attention_s, S_attention_t)
        rela_loss = self.get_rela_loss(preds_S, preds_T)
        return {"fg": self.alpha_fgd * fg_loss, "bg": self.beta_fgd * bg_loss,
                "att": self.gamma_fgd * mask_loss, "glob": self.lambda_fgd * rela_loss}

    def get_attention(self, preds, temp):
        N, C, H, W = preds.shape
        value = torch.abs(preds)
        fea_map = value.mean(axis=1, keepdim=True)
        S_attention = (H * W * F.softmax((fea_map / temp).view(N, -1), dim=1)).view(N, H, W)
        channel_map = value.mean(axis=2, keepdim=False).mean(axis=2, keepdim=False)
        C_attention = C * F.softmax(channel_map / temp, dim=1)
        return S_attention, C_attention

    def get_fea_loss(self, preds_S, preds_T, Mask_fg, Mask_bg, C_s, C_t, S_s, S_t):
        loss_mse = torch.nn.MSELoss(reduction='sum')
        Mask_fg = Mask_fg.unsqueeze(dim=1)
        Mask_bg = Mask_bg.unsqueeze(dim=1)
        C_t = C_t.unsqueeze(dim=-1).unsqueeze(dim=-1)
        S_t = S_t.unsqueeze(dim=1)
        fea_t = torch.mul(torch.mul(preds_T, torch.sqrt(S_t)), torch.sqrt(C_t))
        fg_fea_t = torch.mul(fea_t, torch.sqrt(Mask_fg))
        bg_fea_t = torch.mul(fea_t, torch.sqrt(Mask_bg))
        fea_s = torch.mul(torch.mul(preds_S, torch.sqrt(S_t)), torch.sqrt(C_t))
        fg_fea_s = torch.mul(fea_s, torch.sqrt(Mask_fg))
        bg_fea_s = torch.mul(fea_s, torch.sqrt(Mask_bg))
        return loss_mse(fg_fea_s, fg_fea_t) / len(Mask_fg), loss_mse(bg_fea_s, bg_fea_t) / len(Mask_bg)

    def get_mask_loss(self, C_s, C_t, S_s, S_t):
        return torch.sum(torch.abs((C_s - C_t))) / len(C_s) + torch.sum(torch.abs((S_s - S_t))) / len(S_s)

    def spatial_pool(self, x, in_type):
        batch, channel, width, height = x.size()
        input_x = x.view(batch, channel, height * width).unsqueeze(1)
        context_mask = self.conv_mask_s(x) if in_type == 0 else self.conv_mask_t(x)
        context_mask = F.softmax(context_mask.view(batch, 1, height * width), dim=2).unsqueeze(-1)
        return torch.matmul(input_x, context_mask).view(batch, channel, 1, 1)

    def get_rela_loss(self, preds_S, preds_T):
        loss_mse = torch.nn.MSELoss(reduction='sum')
        out_s = preds_S + self.channel_add_conv_s(self.spatial_pool(preds_S, 0))
        out_t = preds_T + self.channel_add_conv_t(self.spatial_pool(preds_T, 1))
        return loss_mse(out_s, out_t) / len(out_s)


@pytest.mark.parametrize("family,channels", [("one_stage", (8, 8)), ("two_stage", (4, 8)), ("fcos", (8, 8))])
def test_fgd_matches_released_feature_loss(family, channels):
    """yzd-v/FGD, mmdet/distillation/losses/fgd.py, FeatureLoss.forward: every term at the
    released per-family weights (RetinaNet, Faster R-CNN, FCOS configs), one level."""
    from methods.fgd import FGD
    torch.manual_seed(0)
    cs, ct = channels
    params = _defaults("fgd", family)
    info = lambda c: ModelInfo(arch="x", family=family, channels=[c], strides=[8])  # noqa: E731
    fgd = FGD(params, info(cs), info(ct))
    for gc in (fgd.gc_student[0], fgd.gc_teacher[0]):      # W2 starts at zero: give the global term content
        torch.nn.init.normal_(gc.channel_add[-1].weight, std=0.1)
    g = torch.Generator().manual_seed(1)
    fs, ft = torch.randn(2, cs, 10, 12, generator=g), torch.randn(2, ct, 10, 12, generator=g)
    boxes = [torch.tensor([[3.0, 5.0, 40.0, 30.0], [50.0, 10.0, 95.0, 78.0], [0.0, 0.0, 20.0, 20.0]]),
             torch.tensor([[10.0, 12.0, 60.0, 70.0]])]
    img_hw = torch.tensor([[80.0, 96.0], [76.0, 90.0]])
    padded = torch.zeros(2, 3, 4)
    padded[0], padded[1, :1] = boxes[0], boxes[1]
    valid = torch.tensor([[True, True, True], [True, False, False]])
    got = fgd(DetBatch([fs], [ft], padded, valid, torch.zeros(2, 3, dtype=torch.long), img_hw))
    ref = ReleasedFGDFeatureLoss(fgd.gc_student[0], fgd.gc_teacher[0], params["temp"], params["alpha"],
                                 params["beta"], params["gamma"], params["lambda"],
                                 align=None if cs == ct else fgd.adapters[0])
    want = ref(fs, ft, boxes, [{"img_shape": (80, 96)}, {"img_shape": (76, 90)}])
    for key in ("fg", "bg", "att", "glob"):
        _close(got[f"loss_fgd_{key}"], want[key])


# ========================================================================= ICSD, pixel KD
def released_aicsd_losses(s_out, t_out, lo_lambda, pi_lambda, temperature=1.0):
    """Transcription of AmirMansurian/AICSD ``distiller.py``, ``Distiller.forward``: the
    ``pi_loss`` (pixel KD) and ``lo_loss`` (ICSD) branches, 21 classes generalised to C."""
    pi_loss = pi_lambda * torch.nn.KLDivLoss()(F.log_softmax(s_out / temperature, dim=1),
                                               F.softmax(t_out / temperature, dim=1))
    b, c, h, w = s_out.shape
    s_logit = F.softmax(s_out / temperature, dim=2)
    t_logit = F.softmax(t_out / temperature, dim=2)
    kl = torch.nn.KLDivLoss(reduction="batchmean")
    ICCS = torch.empty((c, c))
    ICCT = torch.empty((c, c))
    for i in range(c):
        for j in range(i, c):
            ICCS[j, i] = ICCS[i, j] = kl(s_logit[:, i], s_logit[:, j])
            ICCT[j, i] = ICCT[i, j] = kl(t_logit[:, i], t_logit[:, j])
    ICCS = torch.nn.functional.normalize(ICCS, dim=1)
    ICCT = torch.nn.functional.normalize(ICCT, dim=1)
    lo_loss = lo_lambda * (ICCS - ICCT).pow(2).mean() / b
    return pi_loss, lo_loss


@pytest.mark.parametrize("classes", [19, 21])
def test_icsd_and_pixel_kd_match_released_distiller(classes):
    """AmirMansurian/AICSD, distiller.py, Distiller.forward (pi_loss, lo_loss) and
    train_kd.py's ALW block (``alpha = epoch/120; loss = alpha (loss_seg + lo_loss) +
    (1 - alpha) pi_loss``): the harness's default ICSD and pixel KD at the released
    weights (lo 9500, pi 10), void pixels present in the labels."""
    from harness.tasks.seg import SegBatch
    from methods.icsd import ICSD, PixelKD
    g = torch.Generator().manual_seed(classes)
    s, t = torch.randn(2, classes, 6, 7, generator=g), torch.randn(2, classes, 6, 7, generator=g)
    labels = torch.randint(0, classes, (2, 6, 7), generator=g)
    labels[0, :2] = 255                                   # void pixels count in the released mean
    icsd_p, kd_p = _defaults("icsd", "seg"), _defaults("pixel_kd", "seg")
    pi, lo = released_aicsd_losses(s, t, lo_lambda=icsd_p["w_icsd"], pi_lambda=icsd_p["w_kd"])
    icsd = ICSD(icsd_p, None, None)
    icsd.epoch, icsd.max_epochs = 30, 120
    alpha = 30 / 120
    got = icsd(SegBatch(s, t, labels))
    _close(got["loss_icsd"], alpha * lo)
    _close(got["loss_pixel_kd"], (1 - alpha) * pi)
    assert icsd.student_loss_weight() == pytest.approx(alpha)
    pixel = PixelKD(kd_p, None, None)(SegBatch(s, t, labels))
    _close(pixel["loss_pixel_kd"], released_aicsd_losses(s, t, 0.0, kd_p["weight"])[0])


# ================================================================================ GID
def released_find_top_proposals(boxes, scores, image_sizes, nms_thresh, pre_nms_topk, post_nms_topk,
                                min_box_size):
    """Transcription of daixinghome/Distill_GID_detectron2 ``GID/gid/proposal_utils.py``,
    ``find_top_rpn_proposals`` (one level, as ``gism_method`` calls it): top-k by score,
    clip to the image, drop boxes whose side is not above ``min_box_size``, NMS, top
    ``post_nms_topk``."""
    out = []
    for n, (h, w) in enumerate(image_sizes):
        sc, idx = scores[n].sort(descending=True)
        sc, bx = sc[:pre_nms_topk], boxes[n][idx[:pre_nms_topk]].clone()
        bx[:, 0].clamp_(min=0, max=w)
        bx[:, 1].clamp_(min=0, max=h)
        bx[:, 2].clamp_(min=0, max=w)
        bx[:, 3].clamp_(min=0, max=h)
        keep = ((bx[:, 2] - bx[:, 0]) > min_box_size) & ((bx[:, 3] - bx[:, 1]) > min_box_size)
        bx, sc = bx[keep], sc[keep]
        keep = nms(bx, sc, nms_thresh)[:post_nms_topk]
        out.append(bx[keep])
    return out


def released_assign_levels(boxes, min_level, max_level, canonical_box_size=224, canonical_level=4):
    """Transcription of detectron2 ``modeling/poolers.py``, ``assign_boxes_to_levels``."""
    box_sizes = torch.sqrt((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1]))
    level_assignments = torch.floor(canonical_level + torch.log2(box_sizes / canonical_box_size + 1e-8))
    return torch.clamp(level_assignments, min=min_level, max=max_level).to(torch.int64) - min_level


def released_pooler(feats, strides, boxes_per_image, size=10):
    """detectron2 ``ROIPooler`` with ``ROIAlignV2`` (aligned) and sampling ratio 2."""
    rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes_per_image)])
    lo, hi = int(math.log2(strides[0])), int(math.log2(strides[-1]))
    levels = released_assign_levels(rois[:, 1:], lo, hi)
    out = feats[0].new_zeros(len(rois), feats[0].shape[1], size, size)
    for lvl, (f, s) in enumerate(zip(feats, strides)):
        idx = torch.nonzero(levels == lvl).squeeze(1)
        if len(idx):
            out[idx] = roi_align(f, rois[idx], size, spatial_scale=1.0 / s, sampling_ratio=2, aligned=True)
    return out


def released_rkd_distance(feature_te, feature_st, smooth_l1_beta=1.0):
    """Transcription of ``GID/gid/loss.py``, ``loss_RkdDistance`` (L2 distances)."""
    def pdist(e):
        batch = e.shape[0]
        e_square = e.pow(2.0).sum(dim=1)
        prod = torch.matmul(e, e.permute(1, 0))
        res = torch.sqrt(torch.max(e_square.reshape(-1, 1) + e_square.reshape(1, -1) - 2 * prod,
                                   torch.tensor([1e-12])))
        mask_res = torch.ones_like(res).reshape(-1)
        mask_res[::(batch + 1)] = 0
        res = res * mask_res.reshape(batch, batch)
        mask = res > 0
        res = res * mask
        norm_c = res.sum() / torch.max(mask.sum(), torch.tensor([1]))
        return res / torch.max(norm_c, torch.tensor([1e-12]))
    if feature_st.shape[0] < 3:
        return torch.tensor([0.])
    feature_te = feature_te.reshape(feature_te.shape[0], -1)
    feature_st = feature_st.reshape(feature_st.shape[0], -1)
    t_d, s_d = pdist(feature_te), pdist(feature_st)
    off_diagonal_num = feature_te.shape[0] * feature_te.shape[0] - feature_te.shape[0]
    return F.smooth_l1_loss(t_d, s_d, beta=smooth_l1_beta, reduction="sum") / off_diagonal_num


def released_anchor_labels(gi_boxes, anchors, thresholds=(0.4, 0.5), labels=(0, -1, 1)):
    """Transcription of ``get_GI_instance_labels`` with the student's anchor matcher
    (detectron2 ``Matcher(IOU_THRESHOLDS, IOU_LABELS, allow_low_quality_matches=True)``)."""
    from torchvision.ops import box_iou
    quality = box_iou(gi_boxes, anchors)                                # GI x anchors
    matched_vals, _ = quality.max(dim=0)
    match_labels = torch.full((anchors.shape[0],), 1, dtype=torch.int8)
    bounds = [-float("inf"), *thresholds, float("inf")]
    for lab, low, high in zip(labels, bounds[:-1], bounds[1:]):
        match_labels[(matched_vals >= low) & (matched_vals < high)] = lab
    highest, _ = quality.max(dim=1)
    _, pred_inds = torch.nonzero(quality == highest[:, None], as_tuple=True)
    match_labels[pred_inds] = 1
    match_labels[match_labels == -1] = 0
    return match_labels


def released_response(te, st, mask, mode, beta=1.0):
    """Transcription of ``GID/gid/loss.py``, ``distill_loss_response``."""
    valid = mask.sum()
    st, te = st[mask], te[mask]
    if mode == "bce":
        return F.binary_cross_entropy_with_logits(st, te.sigmoid(), reduction="sum") / max(1, valid)
    return F.smooth_l1_loss(st, te, beta=beta, reduction="sum") / max(1, valid)


def test_gid_matches_the_authors_reproduction():
    """daixinghome/Distill_GID_detectron2, GID/gid/distill_gid.py ``DistillGID.distill_losses``
    with ``gism_method`` (max-logit score), proposal_utils.py ``find_top_rpn_proposals``,
    detectron2's ROIPooler level rule, loss.py ``distill_loss_feature``,
    ``loss_RkdDistance`` and ``distill_loss_response``, at the 2x L1Smo config's weights
    (feature 5e-4, relation 40, cls 0.1, reg 1.0 with beta 0.1)."""
    from methods.gid import GID
    g = torch.Generator().manual_seed(3)
    n, c, ch = 2, 3, 8
    strides = [8, 16, 32, 64, 128]
    hw = torch.tensor([[256.0, 320.0], [240.0, 300.0]])
    sizes = [(32, 40), (16, 20), (8, 10), (4, 5), (2, 3)]
    fs = [torch.randn(n, ch, h, w, generator=g) for h, w in sizes]
    ft = [torch.randn(n, ch, h, w, generator=g) for h, w in sizes]
    # anchors: one square anchor per cell and level, 4 x stride wide
    anchors = torch.cat([torch.stack([(xs + 0.5) * s - 2 * s, (ys + 0.5) * s - 2 * s, (xs + 0.5) * s + 2 * s,
                                      (ys + 0.5) * s + 2 * s], -1).reshape(-1, 4)
                         for (h, w), s in zip(sizes, strides)
                         for ys, xs in [torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")]])
    p = len(anchors)
    jitter = lambda: anchors[None] + 12 * torch.randn(n, p, 4, generator=g)  # noqa: E731
    boxes_t, boxes_s = jitter(), jitter()
    boxes_t[..., 2:] = torch.maximum(boxes_t[..., 2:], boxes_t[..., :2] + 1)
    boxes_s[..., 2:] = torch.maximum(boxes_s[..., 2:], boxes_s[..., :2] + 1)
    cls_t, cls_s = 2 * torch.randn(n, p, c, generator=g), 2 * torch.randn(n, p, c, generator=g)
    reg_t, reg_s = torch.randn(n, p, 4, generator=g), torch.randn(n, p, 4, generator=g)
    head = lambda cls, reg, bx: HeadOutputs(cls=cls, reg=reg, priors=anchors, boxes=bx, points_only=False,  # noqa: E731
                                            pos_iou=0.5, low_quality=True, min_pos_iou=0.0)
    params = _defaults("gid", "one_stage", score="max_logit")
    info = ModelInfo(arch="retinanet", family="one_stage", channels=[ch] * 5, strides=strides)
    gid = GID(params, info, info)
    batch = DetBatch(fs, ft, torch.zeros(n, 1, 4), torch.zeros(n, 1, dtype=torch.bool),
                     torch.zeros(n, 1, dtype=torch.long), hw)
    batch.student_head, batch.teacher_head = head(cls_s, reg_s, boxes_s), head(cls_t, reg_t, boxes_t)
    got = gid(batch)

    # the reproduction: max-logit score, the more confident model's box
    sub = torch.sigmoid(cls_t.amax(-1)) - torch.sigmoid(cls_s.amax(-1))
    gi_box = boxes_s.clone()
    gi_box[sub > 0] = boxes_t[sub > 0]
    gis = released_find_top_proposals(gi_box, sub.abs(), [tuple(x) for x in hw.tolist()], 0.3, 3000, 10, 10)
    assert sum(len(b) for b in gis) > 6
    te_pool, st_pool = released_pooler(ft, strides, gis), released_pooler(fs, strides, gis)
    k = len(te_pool)
    feature = 5e-4 * F.mse_loss(te_pool, st_pool, reduction="sum") / max(1, k * 10 * 10)
    relation = 40 * released_rkd_distance(te_pool, st_pool)
    mask = torch.stack([released_anchor_labels(b, anchors) for b in gis]).flatten() > 0
    cls = 0.1 * released_response(cls_t.reshape(-1, c), cls_s.reshape(-1, c), mask, "bce")
    reg = 1.0 * released_response(reg_t.reshape(-1, 4), reg_s.reshape(-1, 4), mask, "l1", beta=0.1)
    _close(got["loss_gid_feat"], feature)
    _close(got["loss_gid_rel"], relation)
    _close(got["loss_gid_cls"], cls)
    _close(got["loss_gid_reg"], reg)


# ================================================================================ GKP
class ReleasedGKPStrategy:
    """Transcription of hikvision-research/DAVAR-Lab-ML,
    ECCV22_Distilling_Object_Detectors_with_Global_Knowledge/ObjectPerceptron/mmdetection/
    third_party/kd/mmdet/strategy/kd_one_stage_strategy.py (``_map_roi_levels``,
    ``get_gt_mask``, ``template_box_distance``, ``r2i_om_loss``, ``forward_single``,
    ``__call__``), kd_two_stage_strategy.py (``r2i_soft_weight``, ``__call__``) and
    models/losses/kd_loss.py (``KDLoss.forward`` "decouple",
    ``knowledge_distillation_kl_div_loss``), with the released config's
    ``kd_param=[[1, 0], [1], [4, 1]]``, ``kd_t=2``; ``.cuda()`` dropped."""

    def __init__(self, kd_param, kd_t, pair_wise, pair_wise_factor, kd_att_val):
        self.kd_param, self.kd_t, self.pair_wise = kd_param, kd_t, pair_wise
        self.pair_wise_factor, self.kd_att_val = pair_wise_factor, kd_att_val
        self.pool_ops = torch.nn.AdaptiveAvgPool2d(1)

    def _map_roi_levels(self, rois, num_levels):
        scale = torch.sqrt((rois[:, 2] - rois[:, 0] + 1) * (rois[:, 3] - rois[:, 1] + 1))
        target_lvls = torch.floor(torch.log2(scale / 56 + 1e-6))
        return target_lvls.clamp(min=0, max=num_levels - 1).long()

    def get_gt_mask(self, strides, feature, gt_bboxes, level, weights=None):
        featmap_stride = strides[level]
        imit_range = [0, 0, 0, 0, 0]
        mask_batch = []
        for batch in range(len(gt_bboxes)):
            target_lvls = self._map_roi_levels(gt_bboxes[batch], self.level_num)
            gt_level = gt_bboxes[batch][target_lvls == level]
            gt_level_ind = torch.where([target_lvls == level][0] == True)[0]  # noqa: E712
            h, w = feature.size()[-2:]
            mask_per_img = torch.zeros([h, w], dtype=torch.double)
            for ins in range(gt_level.shape[0]):
                gt_level_map = gt_level[ins] / featmap_stride
                lx = max(int(gt_level_map[0]) - imit_range[level], 0)
                rx = min(int(gt_level_map[2]) + imit_range[level], w)
                ly = max(int(gt_level_map[1]) - imit_range[level], 0)
                ry = min(int(gt_level_map[3]) + imit_range[level], h)
                if weights is None:
                    if (lx == rx) or (ly == ry):
                        mask_per_img[ly, lx] += 1
                    else:
                        mask_per_img[ly:ry, lx:rx] += 1
                else:
                    weight = weights[batch][gt_level_ind[ins]]
                    if (lx == rx) or (ly == ry):
                        mask_per_img[ly, lx] = max(mask_per_img[ly, lx], weight)
                    else:
                        mask_per_img[ly:ry, lx:rx] = weight
            if weights is None:
                mask_per_img = (mask_per_img > 0).double()
            mask_batch.append(mask_per_img.unsqueeze(0).repeat(feature.size()[1], 1, 1))
        return torch.stack(mask_batch)

    def template_box_distance(self, pooling_box, template_feat):
        return F.normalize(pooling_box).mm(F.normalize(template_feat).t())

    def r2i_om_loss(self, gt_list, labels, st_feature, tc_feature, template_student, template_teacher,
                    anchor_stride, cls_start_index, use_omloss):
        pool_features_st, pool_features_tc, scores_for_point, scores_for_rkd = [], [], [], []
        sum_diff = torch.tensor(0.0)
        for image_id in range(len(gt_list)):
            robustness_tmp = []
            for bbox in range(len(gt_list[image_id])):
                cx_low, cy_low, cx_high, cy_high = gt_list[image_id][bbox]
                cy_low, cy_high = int(abs(cy_low) / anchor_stride), int(abs(cy_high) / anchor_stride) + 1
                cx_low, cx_high = int(abs(cx_low) / anchor_stride), int(abs(cx_high) / anchor_stride) + 1
                pooling_st = self.pool_ops(st_feature[image_id, :, cy_low:cy_high, cx_low:cx_high]).squeeze()
                pooling_tc = self.pool_ops(tc_feature[image_id, :, cy_low:cy_high, cx_low:cx_high]).squeeze()
                pool_features_st.append(pooling_st)
                pool_features_tc.append(pooling_tc)
                label_b = int(labels[image_id][bbox])
                start_index, end_index = cls_start_index[label_b], cls_start_index[label_b + 1]
                st_q = self.template_box_distance(pooling_st.unsqueeze(0), template_student[start_index:end_index]).max()
                tc_q = self.template_box_distance(pooling_tc.unsqueeze(0), template_teacher[start_index:end_index]).max()
                target = 1 - abs(st_q - tc_q)
                robustness_tmp.append(target.detach())
                scores_for_rkd.append(target.detach())
            scores_for_point.append(torch.tensor(robustness_tmp))
        if use_omloss is False:
            return scores_for_point
        scores_for_rkd = torch.stack(scores_for_rkd, dim=0).unsqueeze(1)
        dist_st = self.template_box_distance(torch.stack(pool_features_st), template_student)
        dist_tc = self.template_box_distance(torch.stack(pool_features_tc), template_teacher)
        sum_diff = F.smooth_l1_loss(dist_st * scores_for_rkd, dist_tc * scores_for_rkd, reduction='mean') \
            * self.pair_wise_factor * self.kd_att_val
        return sum_diff, scores_for_point

    def kd_loss_decouple(self, st_feat, tc_feat, feat_mask):
        kd_param = self.kd_param
        feat_mask_onehot = feat_mask.clone()
        feat_mask_onehot[torch.where(feat_mask_onehot > 0)] = 1
        norms = max(1.0, feat_mask.sum() * 2)
        feat_loss = (torch.pow(st_feat - tc_feat, 2) * feat_mask).sum() / norms * kd_param[2][1] * kd_param[0][0]
        norms_back = max(1.0, (1 - feat_mask_onehot).sum() * 2)
        feat_bg_loss = (torch.pow(st_feat - tc_feat, 2) * (1 - feat_mask_onehot)).sum() / norms_back \
            * kd_param[2][0] * kd_param[0][0]
        return feat_loss, feat_bg_loss

    def kl_div_loss(self, pred, soft_label, weights):
        target = F.softmax(soft_label / self.kd_t, dim=1)
        kd_loss = F.kl_div(F.log_softmax(pred / self.kd_t, dim=1), target, reduction='none').mean(1) \
            * (self.kd_t * self.kd_t)
        return (kd_loss * weights).mean() * self.kd_param[1][0]

    def __call__(self, strides, st_neck, st_adapted, tc_neck, gt_bboxes, gt_labels, protos_s, protos_t,
                 cls_start_index, two_stage):
        self.level_num = len(st_neck)
        points, bgs, pairs = [], [], []
        for level in range(self.level_num):
            use_r2i = self.pair_wise == "use_r2i"
            out = self.r2i_om_loss(gt_bboxes, gt_labels, st_neck[level], tc_neck[level], protos_s[level],
                                   protos_t[level], strides[level], cls_start_index[level], use_r2i)
            pair, robust = out if use_r2i else (torch.tensor(0.0), out)
            mask = self.get_gt_mask(strides, st_adapted[level], gt_bboxes, level, robust)
            fg, bg = self.kd_loss_decouple(st_adapted[level], tc_neck[level], mask)
            points.append(fg * self.kd_att_val)
            bgs.append(bg * self.kd_att_val)
            pairs.append(pair)
        if two_stage:
            return sum(points) / self.level_num, sum(bgs) / self.level_num, sum(pairs)
        return sum(points), sum(bgs), sum(pairs)

    def r2i_soft_weight(self, protos_s, protos_t, cls_start_index, roi_feats_stu, roi_feats_tea,
                        target_lvls, labels):
        robust_weights = []
        for ind in range(len(roi_feats_stu)):
            level, label = target_lvls[ind], labels[ind]
            start_ind, end_ind = cls_start_index[level][label], cls_start_index[level][label + 1]
            pooling_st = self.pool_ops(roi_feats_stu[ind]).squeeze()
            pooling_tc = self.pool_ops(roi_feats_tea[ind]).squeeze()
            st_q = self.template_box_distance(pooling_st.unsqueeze(0), protos_s[level][start_ind:end_ind]).max()
            tc_q = self.template_box_distance(pooling_tc.unsqueeze(0), protos_t[level][start_ind:end_ind]).max()
            robust_weights.append((1 - abs(st_q - tc_q)).detach())
        return torch.stack(robust_weights)


def _gkp_case(two_stage: bool, global_loss: str):
    from methods.gkp import GKP
    g = torch.Generator().manual_seed(11 + two_stage)
    n, ch, n_cls = 2, 6, 3
    strides = [4, 8, 16, 32, 64] if two_stage else [8, 16, 32, 64, 128]
    img = 512
    fs = [torch.randn(n, ch, img // s, img // s, generator=g) for s in strides]
    ft = [torch.randn(n, ch, img // s, img // s, generator=g) for s in strides]
    boxes = [torch.tensor([[10.0, 20.0, 60.0, 90.0], [100.0, 40.0, 300.0, 260.0], [5.0, 300.0, 9.0, 303.0],
                           [200.0, 200.0, 500.0, 480.0]]),
             torch.tensor([[30.0, 30.0, 150.0, 110.0], [33.0, 35.0, 40.0, 41.0], [250.0, 260.0, 380.0, 400.0]])]
    labels = [torch.tensor([0, 2, 1, 2]), torch.tensor([1, 0, 2])]
    padded = torch.zeros(n, 4, 4)
    valid = torch.zeros(n, 4, dtype=torch.bool)
    lab = torch.full((n, 4), -1)
    for i, (b, lb) in enumerate(zip(boxes, labels)):
        padded[i, :len(b)], valid[i, :len(b)], lab[i, :len(b)] = b, True, lb
    # prototypes per level, sorted by class, 2 or 3 per class (the released layout: cls_start_index)
    counts = [2, 3, 2]
    starts = [0, 2, 5, 7]
    protos = [(torch.randn(7, ch, generator=g), torch.randn(7, ch, generator=g),
               torch.tensor([c for c, k in enumerate(counts) for _ in range(k)])) for _ in strides]
    family = "two_stage" if two_stage else "one_stage"
    info = ModelInfo(arch="x", family=family, channels=[ch] * 5, strides=strides)
    gkp = GKP(_defaults("gkp", family, global_loss=global_loss), info, info)
    gkp.prototypes, gkp.epoch, gkp.max_epochs = protos, 6, 24
    fade = 1 - 6 / 24
    batch = DetBatch(fs, ft, padded, valid, lab, torch.tensor([[img, img]] * n, dtype=torch.float32))
    soft = None
    if two_stage:       # the positive RoIs replace the GT boxes; their RoI-head logits
        logits_s, logits_t = torch.randn(7, n_cls + 1, generator=g), torch.randn(7, n_cls + 1, generator=g)
        batch.rois = RoIBatch(padded, valid, lab, logits_s, logits_t)
        soft = (logits_s, logits_t)
    got = gkp(batch)
    adapted = [gkp.adapters[i](f) for i, f in enumerate(fs)]
    ref = ReleasedGKPStrategy([[1, 0], [1], [4, 1]], 2, "use_r2i" if global_loss == "released" else "use_pgm",
                              5, fade)
    fg, bg, pair = ref(strides, fs, adapted, ft, boxes, labels, [p[0] for p in protos], [p[1] for p in protos],
                       [starts] * 5, two_stage)
    _close(got["loss_gkp_fg"], fg)
    _close(got["loss_gkp_bg"], bg)
    if global_loss == "released":
        _close(got["loss_gkp_global"], pair)
    else:
        assert "loss_gkp_global" not in got
    if soft is not None:
        rois = torch.cat([torch.cat([torch.full((len(b), 1), float(i)), b], 1) for i, b in enumerate(boxes)])
        scale = torch.sqrt((rois[:, 3] - rois[:, 1]) * (rois[:, 4] - rois[:, 2]))      # mmdet 2.x map_roi_levels
        lvls = torch.floor(torch.log2(scale / 56 + 1e-6)).clamp(min=0, max=3).long()
        feats = lambda fm: torch.cat([roi_align(fm[int(l)], r[None], 7, spatial_scale=1 / strides[int(l)],  # noqa: E731
                                                sampling_ratio=0, aligned=True) for r, l in zip(rois, lvls)])
        w = ref.r2i_soft_weight([p[0] for p in protos], [p[1] for p in protos], [starts] * 5, feats(fs), feats(ft),
                                lvls, torch.cat(labels))
        _close(got["loss_gkp_roi_kd"], ref.kl_div_loss(soft[0], soft[1], w))


@pytest.mark.parametrize("global_loss", ["off", "released"])
def test_gkp_one_stage_matches_released_strategy(global_loss):
    """DAVAR-Lab-ML kd_one_stage_strategy.py + kd_loss.py (see ReleasedGKPStrategy): local
    fg/bg losses per level with level-mapped weighted masks, summed over P3-P7; the
    ``use_r2i`` global loss when on; decay 1 - epoch / max_epochs."""
    _gkp_case(two_stage=False, global_loss=global_loss)


@pytest.mark.parametrize("global_loss", ["off", "released"])
def test_gkp_two_stage_matches_released_strategy(global_loss):
    """DAVAR-Lab-ML kd_two_stage_strategy.py: the positive RoIs as instances, local losses
    averaged over P2-P6, the per-RoI soft-label KD weighted by r2i_soft_weight (7x7 RoIAlign
    features on the RoI head's level), T = 2."""
    _gkp_case(two_stage=True, global_loss=global_loss)


#: yzd-v/FGD, configs/distillers/fgd/: the weights each released config sets (temp,
#: alpha_fgd, beta_fgd, gamma_fgd, lambda_fgd) and init_student = True in every one of these
RELEASED_FGD_CONFIGS = {
    "fgd_retina_r101_fpn_2x_distill_retina_r50_fpn_2x_coco.py": ("one_stage", (0.5, 0.001, 0.0005, 0.0005, 0.000005)),
    "fgd_gfl_r101_distill_gfl_r50_fpn_1x_coco.py": ("one_stage", (0.5, 0.001, 0.0005, 0.0005, 0.000005)),
    "fgd_faster_rcnn_r101_fpn_2x_distill_faster_rcnn_r50_fpn_2x_coco.py":
        ("two_stage", (0.5, 0.00005, 0.000025, 0.00005, 0.0000005)),
    "fgd_mask_rcnn_r101_fpn_distill_mask_rcnn_r50_fpn_2x_coco.py":
        ("two_stage", (0.5, 0.00005, 0.000025, 0.00005, 0.0000005)),
    "fgd_fcos_r101_distill_fcos_r50_2x_coco.py": ("fcos", (0.8, 0.0016, 0.0008, 0.0008, 0.000008)),
    "fgd_reppoints_r101_fpn_distill_reppoints_r50_fpn_2x_coco.py": ("reppoints", (0.5, 0.0016, 0.0008, 0.0008, 0.000008)),
}


@pytest.mark.parametrize("config", sorted(RELEASED_FGD_CONFIGS))
def test_fgd_defaults_are_the_released_configs(config):
    """Each family's FGD defaults are the weights of the released config of that family
    (docs/fidelity.md calls them exact: this is the test that compares them)."""
    from harness import catalog
    family, (temp, alpha, beta, gamma, lam) = RELEASED_FGD_CONFIGS[config]
    params = catalog.method_params("fgd", family, {})
    assert (params["temp"], params["alpha"], params["beta"], params["gamma"], params["lambda"]) == \
        (temp, alpha, beta, gamma, lam)
    assert params["inherit"] is True
