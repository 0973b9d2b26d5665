"""The distillation wrapper: frozen teacher, gradients only where they belong, and a
student export that loads into a plain mmdet detector."""
from __future__ import annotations

import copy

import pytest
import torch

from .conftest import tiny_model


@pytest.fixture(scope="module")
def parts(det_batch):
    from harness.tasks.det.models import build_detector, detector_cfg, tapped_info
    from harness.tasks.det.wrapper import DistillationModel
    from methods.fgd import FGD

    s_cfg = detector_cfg(tiny_model("s", 8, 8), 4)
    t_cfg = detector_cfg(tiny_model("t", 8, 16), 4)
    torch.manual_seed(0)
    student, teacher = build_detector(s_cfg), build_detector(t_cfg)
    student.init_weights()
    teacher.init_weights()
    params = {"temp": 0.5, "alpha": 1e-3, "beta": 5e-4, "gamma": 5e-4, "lambda": 5e-6}
    fgd = FGD(params, tapped_info(tiny_model("s", 8, 8), s_cfg), tapped_info(tiny_model("t", 8, 16), t_cfg))
    model = DistillationModel(student, teacher, fgd, num_levels=5)

    return model, s_cfg, det_batch


def test_teacher_unchanged_and_gradients_reach_student_and_adapters_only(parts):
    model, _, batch = parts
    model.train()
    assert not model.teacher.training
    before = copy.deepcopy(model.teacher.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    data = model.data_preprocessor(batch, True)
    losses = model(**data, mode="loss")
    assert {"loss_cls", "loss_bbox", "loss_fgd_fg", "loss_fgd_bg", "loss_fgd_att", "loss_fgd_glob"} <= set(losses)
    total = sum(v.sum() if isinstance(v, torch.Tensor) else sum(x.sum() for x in v) for v in losses.values())
    assert torch.isfinite(total)
    opt.zero_grad()
    total.backward()
    opt.step()
    for name, p in model.teacher.named_parameters():
        assert p.grad is None, name
    after = model.teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)      # BN buffers included
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.backbone.parameters())
    assert model.distiller.adapters[0].weight.grad is not None           # 8 -> 16 channels
    assert model.distiller.adapters[0].weight.grad.abs().sum() > 0
    # the teacher-side GcBlock is trained with the student; its last conv starts at zero
    assert model.distiller.gc_teacher[0].channel_add[3].weight.grad is not None


def test_distiller_sees_the_features_the_student_head_used(parts):
    model, _, batch = parts
    model.train()
    data = model.data_preprocessor(batch, True)
    seen = {}
    orig = model.distiller.forward

    def spy(b):
        seen["s"], seen["t"] = b.student_feats, b.teacher_feats
        return orig(b)
    model.distiller.forward = spy
    try:
        model(**data, mode="loss")
    finally:
        model.distiller.forward = orig
    with torch.no_grad():
        ref = model.student.extract_feat(data["inputs"])
    assert len(seen["s"]) == 5 and seen["s"][0].shape[1] == 8 and seen["t"][0].shape[1] == 16
    assert seen["s"][0].requires_grad and not seen["t"][0].requires_grad
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(seen["s"], ref))


def test_exported_student_loads_into_plain_detector(parts, tmp_path):
    from harness.tasks.det.models import build_detector
    from harness.run.weights import load_weights, save_weights

    model, s_cfg, batch = parts
    path = save_weights(model.student_state_dict(), tmp_path / "student.pth", {"arch": "retinanet"})
    assert not any(k.startswith(("teacher", "distiller")) for k in model.student_state_dict())
    plain = build_detector(s_cfg)
    load_weights(plain, path)            # strict: every key must fit, none may be left over
    plain.eval()
    model.eval()
    data = model.data_preprocessor(batch, False)
    with torch.no_grad():
        a = plain.predict(data["inputs"], copy.deepcopy(data["data_samples"]))
        b = model(**copy.deepcopy(data), mode="predict")
    assert torch.allclose(a[0].pred_instances.scores, b[0].pred_instances.scores)


def test_inherit_copies_neck_and_head_and_refuses_other_shapes():
    from harness.tasks.det.models import build_detector, detector_cfg
    from harness.tasks.det.wrapper import inherit_neck_and_head

    deeper = dict(tiny_model("t", 8, 16))
    deeper["backbone"] = {"depth": 34, "base_channels": 8}        # R34 -> R18: same widths, as R101 -> R50
    teacher = build_detector(detector_cfg(deeper, 4))
    student = build_detector(detector_cfg(tiny_model("s", 8, 16), 4))
    teacher.init_weights()
    inherit_neck_and_head(student, teacher)
    t, s = teacher.state_dict(), student.state_dict()
    copied = [k for k in s if k.startswith(("neck.", "bbox_head."))]
    assert copied and all(torch.equal(s[k], t[k]) for k in copied)
    assert not torch.equal(s["backbone.conv1.weight"], t["backbone.conv1.weight"])
    narrow = build_detector(detector_cfg(tiny_model("n", 8, 8), 4))
    with pytest.raises(ValueError, match="inherit"):
        inherit_neck_and_head(narrow, teacher)


def test_det_batch_pads_boxes_and_handles_images_without_boxes():
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    from methods._base import DetBatch

    def sample(boxes):
        s = DetDataSample(metainfo={"img_shape": (32, 48)})
        s.gt_instances = InstanceData(bboxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                                      labels=torch.arange(len(boxes)))
        return s
    feats = [torch.zeros(3, 1, 4, 4)]
    b = DetBatch.from_data_samples(feats, feats, [sample([[0, 0, 4, 4], [1, 1, 5, 5]]), sample([]),
                                                  sample([[2, 2, 3, 3]])])
    assert b.boxes.shape == (3, 2, 4)
    assert b.box_valid.tolist() == [[True, True], [False, False], [True, False]]
    assert b.labels.tolist() == [[0, 1], [-1, -1], [0, -1]]
    assert b.img_hw.tolist() == [[32.0, 48.0]] * 3
    empty = DetBatch.from_data_samples(feats[:1], feats[:1], [sample([])])
    assert empty.boxes.shape == (1, 1, 4) and not empty.box_valid.any()
