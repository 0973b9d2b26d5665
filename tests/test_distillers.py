"""Every registered detection distiller x every detector family: a few training steps on
tiny CPU models give finite losses, gradients reach the student and the distiller's
parts only, and the teacher does not change. Grows with the registry."""
from __future__ import annotations

import copy

import pytest
import torch

from harness import catalog

from .conftest import (THROWAWAY, check_distiller_losses, check_gradients_reach_student_and_distiller_only,
                       tiny_model, train_with_frozen_teacher)

DET_METHODS = [m.name for m in catalog.METHODS if m.target and "det" in m["tasks"]]
DET_ARCHS = [a.name for a in catalog.ARCHS if a["task"] == "det" and a.name != "cascade_rcnn"]  # teacher-only
TINY_OVERRIDES = {"gkp": {"pgm_min_box": 0.0}, "gid": {"min_size": 2.0}}   # 64 px images: small boxes


def _model(arch: str, name: str, neck: int) -> dict:
    m = tiny_model(name, 8, neck)
    m["arch"] = arch
    if arch == "faster_rcnn":
        m["head"] = {"fc_out_channels": 16}
        m["model"] = {"rpn_head": {"feat_channels": neck}}
    elif arch == "fcos":
        m["head"] = {"feat_channels": neck, "stacked_convs": 1, "norm_cfg": {"type": "GN", "num_groups": 4}}
    return m


def _distilled(method: str, arch: str, det_batch: dict):
    """Tiny student (8 wide) and teacher (16 wide) of ``arch`` with ``method``'s distiller,
    built as a trial builds them, after the before-epoch step (PGM)."""
    from harness.tasks.det.models import build_detector, detector_cfg, tapped_info
    from harness.tasks.det.wrapper import DistillationModel

    torch.manual_seed(0)
    s_model, t_model = _model(arch, "s", 8), _model(arch, "t", 16)
    s_cfg, t_cfg = detector_cfg(s_model, 4), detector_cfg(t_model, 4)
    student, teacher = build_detector(s_cfg), build_detector(t_cfg)
    student.init_weights()
    teacher.init_weights()
    # tiny 64 px images: let every GT box be a prototype candidate
    params = catalog.method_params(method, catalog.ARCHS.get(arch)["family"], TINY_OVERRIDES.get(method))
    every = bool(catalog.METHODS.get(method).get("all_levels", False))
    s_info, t_info = tapped_info(s_model, s_cfg, every), tapped_info(t_model, t_cfg, every)
    distiller = catalog.METHODS.load(method)(params, s_info, t_info)
    model = DistillationModel(student, teacher, distiller, num_levels=len(s_info.strides))
    model.train()
    model.prepare_epoch([copy.deepcopy(det_batch)])      # before-epoch step (PGM), as the harness runs it
    data = model.data_preprocessor(copy.deepcopy(det_batch), True)
    own = set(student.loss(data["inputs"], data["data_samples"]))
    return model, own


def _losses(model, det_batch):
    return model(**model.data_preprocessor(copy.deepcopy(det_batch), True), mode="loss")


@pytest.mark.parametrize("arch", DET_ARCHS)
@pytest.mark.parametrize("method", DET_METHODS)
def test_distiller_trains_on_every_family(method, arch, det_batch):
    model, own = _distilled(method, arch, det_batch)
    assert model.student.training
    if hasattr(model.distiller, "prototypes"):
        assert sum(len(c) for _, _, c in model.distiller.prototypes) > 0

    def losses():
        out = _losses(model, det_batch)
        check_distiller_losses(out, own)
        return out
    train_with_frozen_teacher(model, losses)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.backbone.parameters())
    adapters = getattr(model.distiller, "adapters", None)
    if adapters is not None:    # 8 -> 16 channels: real adapters (GID: only the levels its GI boxes map to)
        assert any(a.weight.grad is not None and a.weight.grad.abs().sum() > 0 for a in adapters)
    check_gradients_reach_student_and_distiller_only(model)


def test_the_loop_picks_up_a_method_registered_from_the_tests():
    assert THROWAWAY["det"] in DET_METHODS


def test_gkp_distils_per_roi_on_a_two_stage_student(det_batch):
    """GKP's per-RoI soft-label KD runs on the teacher's RoI head for Faster R-CNN."""
    model, _ = _distilled("gkp", "faster_rcnn", det_batch)
    assert _losses(model, det_batch)["loss_gkp_roi_kd"] > 0


def test_gid_refuses_a_different_anchor_layout():
    from harness.tasks.det.models import detector_cfg, tapped_info
    s_model, t_model = _model("retinanet", "s", 8), _model("retinanet", "t", 16)
    t_model["head"]["anchor_generator"] = {"octave_base_scale": 8}
    s_info = tapped_info(s_model, detector_cfg(s_model, 4))
    t_info = tapped_info(t_model, detector_cfg(t_model, 4))
    with pytest.raises(ValueError, match="same head and prior"):
        catalog.METHODS.load("gid")(catalog.method_params("gid", "one_stage"), s_info, t_info)


def test_feature_mse_by_hand():
    """Two levels, equal widths (no adapter): sum over levels of mean((s - t)^2), times the weight."""
    from methods._base import ModelInfo
    info = ModelInfo(arch="x", family="one_stage", channels=[2, 2], strides=[8, 16], task="det")
    mse = catalog.METHODS.load("feature_mse")({"weight": 2.0}, info, info)
    fs = [torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 1, 1)]
    ft = [torch.ones(1, 2, 2, 2) * 3, torch.ones(1, 2, 1, 1)]
    from methods._base import DetBatch
    batch = DetBatch(student_feats=fs, teacher_feats=ft, boxes=torch.zeros(1, 0, 4),
                     box_valid=torch.zeros(1, 0, dtype=torch.bool), labels=torch.zeros(1, 0, dtype=torch.long),
                     img_hw=torch.tensor([[16, 16]]))
    assert float(mse(batch)["loss_feat_mse"]) == 2.0 * (9.0 + 0.0)
