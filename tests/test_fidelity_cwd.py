"""CWD against transcriptions of its three releases, at their released scale (COCO FPN
levels of 256 channels at a 1333 x 800 input's P3 .. P7 sizes for detection; Cityscapes'
19-class logits of a 512 x 1024 crop at output stride 8 for segmentation), each variant
against its own release, and the defaults against the released configs.

Each ``Released*`` below is a transcription, written for this test, of the released
function named in its docstring, kept as close to the original as a CPU test allows;
Paddle's operators are written with their torch equivalents."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from harness import catalog
from methods._base import DetBatch, ModelInfo, SegBatch

REL = 1e-5


def released_mmrazor(preds_S: torch.Tensor, preds_T: torch.Tensor, tau: float = 1.0,
                     loss_weight: float = 1.0) -> torch.Tensor:
    """open-mmlab/mmrazor ``mmrazor/models/losses/cwd.py``, ``ChannelWiseDivergence.forward``."""
    assert preds_S.shape[-2:] == preds_T.shape[-2:]
    N, C, W, H = preds_S.shape
    softmax_pred_T = F.softmax(preds_T.view(-1, W * H) / tau, dim=1)
    logsoftmax = torch.nn.LogSoftmax(dim=1)
    loss = torch.sum(softmax_pred_T * logsoftmax(preds_T.view(-1, W * H) / tau) -
                     softmax_pred_T * logsoftmax(preds_S.view(-1, W * H) / tau)) * (tau ** 2)
    return loss_weight * loss / (C * N)


def released_cirkd(preds_S: torch.Tensor, preds_T: torch.Tensor, conv: torch.nn.Module,
                   temperature: float = 1.0) -> torch.Tensor:
    """winycg/CIRKD ``losses/cwd.py``, ``CriterionCWD(norm_type='channel', divergence='kl')``:
    ``ChannelNorm`` (softmax over positions), ``KLDivLoss(reduction='sum')``, ``/ (n * c)``
    with ``n, c`` read before the 1x1 conv, ``* temperature ** 2``."""
    n, c, h, w = preds_S.shape
    if preds_S.size(1) != preds_T.size(1):
        preds_S = conv(preds_S)

    def normalize(featmap):
        n_, c_, h_, w_ = featmap.shape
        return featmap.reshape((n_, c_, -1)).softmax(dim=-1)
    norm_s = normalize(preds_S / temperature)
    norm_t = normalize(preds_T.detach() / temperature)
    norm_s = norm_s.log()
    loss = torch.nn.KLDivLoss(reduction="sum")(norm_s, norm_t)
    loss /= n * c
    return loss * (temperature ** 2)


def _feature_norm(feat: torch.Tensor) -> torch.Tensor:
    """PaddleDetection ``ppdet/slim/distill_loss.py``, ``feature_norm`` (paddle's ``std`` is unbiased)."""
    N, C, H, W = feat.shape
    feat = feat.permute(1, 0, 2, 3).reshape([C, -1])
    mean = feat.mean(dim=-1, keepdim=True)
    std = feat.std(dim=-1, keepdim=True)
    feat = (feat - mean) / (std + 1e-6)
    return feat.reshape([C, N, H, W]).permute(1, 0, 2, 3)


def released_paddle(preds_s: torch.Tensor, preds_t: torch.Tensor, align: torch.nn.Module | None,
                    normalize: bool = True, tau: float = 1.0, weight: float = 1.0) -> torch.Tensor:
    """PaddlePaddle/PaddleDetection ``ppdet/slim/distill_loss.py``, ``CWDFeatureLoss.forward``
    with ``distill_softmax``."""
    assert preds_s.shape[-2:] == preds_t.shape[-2:]
    N, C, H, W = preds_s.shape
    eps = 1e-5
    if align is not None:
        preds_s = align(preds_s)
    if normalize:
        preds_s = _feature_norm(preds_s)
        preds_t = _feature_norm(preds_t)

    def distill_softmax(x, tau):
        _, _, w, h = x.shape
        x = torch.reshape(x, [-1, w * h])
        x = x / tau
        return F.softmax(x, dim=1)
    softmax_pred_s = distill_softmax(preds_s, tau)
    softmax_pred_t = distill_softmax(preds_t, tau)
    loss = torch.sum(-softmax_pred_t * torch.log(eps + softmax_pred_s) +
                     softmax_pred_t * torch.log(eps + softmax_pred_t))
    return weight * loss / (C * N)


# 1333 x 800 (mmdet's COCO scale), padded to 32: P3 .. P7
FPN_SIZES = [(100, 168), (50, 84), (25, 42), (13, 21), (7, 11)]


def _det(student_channels: int, teacher_channels: int = 256, n: int = 2):
    g = torch.Generator().manual_seed(0)
    fs = [torch.randn(n, student_channels, h, w, generator=g, dtype=torch.float64) for h, w in FPN_SIZES]
    ft = [torch.randn(n, teacher_channels, h, w, generator=g, dtype=torch.float64) * 2 for h, w in FPN_SIZES]
    return fs, ft


def _cwd(variant: str, task: str, cs: int, ct: int, levels: int):
    info = lambda c: ModelInfo(arch="x", family="one_stage" if task == "det" else "seg",   # noqa: E731
                               channels=[c] * levels, strides=[8 * 2 ** i for i in range(levels)], task=task)
    params = catalog.method_params("cwd", "one_stage" if task == "det" else "seg", {"variant": variant})
    return catalog.METHODS.load("cwd")(params, info(cs), info(ct)).double()


def _batch(fs, ft) -> DetBatch:
    n = fs[0].shape[0]
    return DetBatch(student_feats=fs, teacher_feats=ft, boxes=torch.zeros(n, 0, 4), box_valid=torch.zeros(n, 0, dtype=torch.bool),
                    labels=torch.zeros(n, 0, dtype=torch.long), img_hw=torch.tensor([[800, 1333]] * n))


@pytest.mark.parametrize("channels", [256, 128])
def test_cwd_detection_matches_each_release(channels):
    """Every FPN level at weight 10 (mmrazor's configs), the student 256 wide (no adapter) or
    128 wide (each release's 1x1 conv: the harness's adapter's weights given to it)."""
    fs, ft = _det(channels)
    for variant in ("mmrazor", "cirkd", "paddle"):
        cwd = _cwd(variant, "det", channels, 256, len(FPN_SIZES))
        got = float(cwd(_batch(fs, ft))["loss_cwd"])
        want = 0.0
        for a, s, t in zip(cwd.adapters, fs, ft):
            if variant == "mmrazor":          # mmrazor compares maps already of one width (its connector)
                want += float(released_mmrazor(a(s), t, tau=1.0, loss_weight=10.0))
            elif variant == "cirkd":
                want += 10.0 * float(released_cirkd(s, t, a, temperature=1.0))
            else:
                align = None if channels == 256 else a
                want += float(released_paddle(s, t, align, normalize=True, tau=1.0, weight=10.0))
        assert got == pytest.approx(want, rel=REL), (variant, got, want)


def test_cwd_segmentation_matches_each_release_on_cityscapes_logits():
    """19-class logits of a 512 x 1024 crop at output stride 8, weight 5 (mmrazor's mmseg
    config), at T = 1 and at T = 4 for every release."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 19, 64, 128, generator=g, dtype=torch.float64) * 3
    t = torch.randn(2, 19, 64, 128, generator=g, dtype=torch.float64) * 3
    batch = SegBatch(student_logits=s, teacher_logits=t, labels=torch.zeros(2, 512, 1024, dtype=torch.long),
                     student_head_logits=s, teacher_head_logits=t)
    for temp in (1.0, 4.0):
        for variant, want in (("mmrazor", released_mmrazor(s, t, tau=temp, loss_weight=5.0)),
                              ("cirkd", 5.0 * released_cirkd(s, t, torch.nn.Identity(), temperature=temp)),
                              ("paddle", released_paddle(s, t, None, normalize=True, tau=temp, weight=5.0))):
            cwd = _cwd(variant, "seg", 19, 19, 1)
            cwd.params["temp"] = temp
            got = float(cwd(batch)["loss_cwd"])
            assert got == pytest.approx(float(want), rel=REL), (variant, temp, got, float(want))


def test_cwd_defaults_are_the_released_configs():
    """tau 1 and loss_weight 10 on each of the five FPN outputs (mmrazor
    cwd_fpn_frcnn_r101_frcnn_r50_1x_coco.py: loss_cwd_fpn0 .. 4, recorder ``neck``), 5 on
    the decode head's logits (cwd_logits_pspnet_r101_d8_pspnet_r18_d8_512x1024_cityscapes_80k.py)."""
    for family in ("one_stage", "two_stage", "fcos"):
        assert catalog.method_params("cwd", family) == {"temp": 1.0, "weight": 10.0, "variant": "mmrazor"}
    assert catalog.method_params("cwd", "seg") == {"temp": 1.0, "weight": 5.0, "variant": "mmrazor"}
    from harness.tasks.det.models import detector_cfg, tapped_info
    model = {"name": "s", "arch": "faster_rcnn", "pretrained": False}
    every = bool(catalog.METHODS.get("cwd").get("all_levels"))
    assert len(tapped_info(model, detector_cfg(model, 80), every).strides) == 5      # P2 .. P6: all of the neck


def test_cwd_refuses_maps_of_different_sizes():
    cwd = _cwd("mmrazor", "seg", 19, 19, 1)
    s, t = torch.randn(1, 19, 8, 8, dtype=torch.float64), torch.randn(1, 19, 16, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="same shape"):
        cwd(SegBatch(student_logits=s, teacher_logits=t, labels=torch.zeros(1, 64, 64, dtype=torch.long),
                     student_head_logits=s, teacher_head_logits=t))
