"""Segmentation in the harness: every segmentation distiller trains a few steps on tiny
CPU models with the teacher unchanged; ICSD's adaptive weighting scales the student's own
loss; a tiny Cityscapes-layout suite runs through Ray Tune with mIoU rows."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from harness import catalog
from harness.data.synth import write_cityscapes

from .conftest import (THROWAWAY, check_distiller_losses, check_gradients_reach_student_and_distiller_only,
                       train_with_frozen_teacher)

SEG_SUITE = """
name: seg-tiny
pretrained: false
datasets:
  cs: {{format: cityscapes, root: {root}, synth: {{train_images: 4, val_images: 2, image_size: 32, seed: 0}}}}
teachers:
  r18: {{arch: deeplabv3plus_r18, backbone: {{base_channels: 16}}, head: {{c1_in_channels: 16, in_channels: 128}},
        model: {{auxiliary_head: {{in_channels: 64}}}}}}
students:
  mnv2: {{arch: deeplabv3plus_mnv2, backbone: {{widen_factor: 0.5}}, head: {{in_channels: 160, c1_in_channels: 16}},
         model: {{auxiliary_head: {{in_channels: 48}}}}}}
pairs: [[r18, mnv2]]
methods: [pixel_kd, icsd]
seeds: [0]
schedule: {{epochs: 1, val_interval: 1, batch_size: 2, lr: 0.01, warmup_iters: 0, img_scale: [64, 32],
           crop_size: [32, 32]}}
resources: {{cpu: 1, gpu: 0}}
output: {output}
"""
TINY_T = {"name": "t", "arch": "deeplabv3plus_r18", "pretrained": False, "backbone": {"base_channels": 16},
          "head": {"c1_in_channels": 16, "in_channels": 128}, "model": {"auxiliary_head": {"in_channels": 64}}}
TINY_S = {"name": "s", "arch": "deeplabv3plus_mnv2", "pretrained": False, "backbone": {"widen_factor": 0.5},
          "head": {"in_channels": 160, "c1_in_channels": 16}, "model": {"auxiliary_head": {"in_channels": 48}}}


@pytest.fixture(scope="module")
def seg_batch(tmp_path_factory):
    from mmseg.datasets import CityscapesDataset
    from mmseg.utils import register_all_modules

    from harness.data.formats import CityscapesFormat
    register_all_modules(init_default_scope=False)
    root = write_cityscapes(tmp_path_factory.mktemp("seg") / "cs", train_images=2, val_images=1, image_size=32)
    cfg = CityscapesFormat().dataset({"root": str(root), "classes": None}, "train", [64, 32], [32, 32])
    cfg.pop("type")
    from mmengine.registry import DefaultScope
    with DefaultScope.overwrite_default_scope("mmseg"):
        ds = CityscapesDataset(**cfg)
        samples = [ds[i] for i in range(2)]          # one pipeline run per sample: image and labels agree
        return {"inputs": [s["inputs"] for s in samples], "data_samples": [s["data_samples"] for s in samples]}


SEG_METHODS = [m.name for m in catalog.METHODS if m.target and "seg" in m["tasks"]]


def _model(method):
    from harness.tasks.seg import SegDistillationModel, build_model, model_info
    torch.manual_seed(0)
    schedule = {"crop_size": [32, 32]}
    (student, s_cfg), (teacher, t_cfg) = build_model(TINY_S, 19, schedule), build_model(TINY_T, 19, schedule)
    distiller = catalog.METHODS.load(method)(catalog.method_params(method, "seg"),
                                             model_info(TINY_S, student, s_cfg, 19), model_info(TINY_T, teacher, t_cfg, 19))
    return SegDistillationModel(student, teacher, distiller)


@pytest.mark.parametrize("method", SEG_METHODS)
def test_seg_distiller_trains_and_teacher_is_unchanged(method, seg_batch):
    model = _model(method).train()
    model.distiller.epoch, model.distiller.max_epochs = 1, 2
    data = model.data_preprocessor(copy.deepcopy(seg_batch), True)
    own = set(model.student.loss(data["inputs"], data["data_samples"]))

    def losses():
        out = model(**model.data_preprocessor(copy.deepcopy(seg_batch), True), mode="loss")
        check_distiller_losses(out, own)
        return out
    train_with_frozen_teacher(model, losses)
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.backbone.parameters())
    check_gradients_reach_student_and_distiller_only(model)


def test_a_seg_distiller_is_told_what_it_taps(seg_batch):
    """Both sides' ModelInfo describe the decode head's input features, and the batch
    carries them, with the logits at the head's own resolution and at the input size."""
    from harness.tasks.seg import SegDistillationModel
    seen = {}

    class Probe(catalog.METHODS.load("tmp_cwd")):
        def forward(self, batch):
            seen["batch"] = batch
            return super().forward(batch)
    base = _model("tmp_cwd")
    model = SegDistillationModel(base.student, base.teacher, Probe(base.distiller.params, base.distiller.student_info,
                                                                   base.distiller.teacher_info)).train()
    model(**model.data_preprocessor(copy.deepcopy(seg_batch), True), mode="loss")
    batch, s_info, t_info = seen["batch"], model.distiller.student_info, model.distiller.teacher_info
    assert model.distiller.task == "seg" and s_info.num_classes == 19
    assert [f.shape[1] for f in batch.student_feats] == s_info.channels
    assert [f.shape[1] for f in batch.teacher_feats] == t_info.channels
    assert [32 // f.shape[2] for f in batch.student_feats] == s_info.strides
    assert batch.student_logits.shape[2:] == batch.labels.shape[1:] == (32, 32)
    assert batch.student_head_logits.shape[1] == 19 and batch.student_head_logits.shape[2] < 32
    assert batch.teacher_head_logits.shape == batch.student_head_logits.shape
    assert not batch.teacher_feats[-1].requires_grad and batch.student_feats[-1].requires_grad


def test_the_loop_picks_up_a_method_registered_from_the_tests():
    assert THROWAWAY["seg"] in SEG_METHODS


def test_alw_scales_the_students_own_loss(seg_batch):
    model = _model("icsd").train()
    data = model.data_preprocessor(copy.deepcopy(seg_batch), True)
    torch.manual_seed(0)                                   # the same dropout masks every time
    own = model.student.loss(data["inputs"], data["data_samples"])["decode.loss_ce"]
    for epoch, alpha in ((0, 0.0), (2, 0.5), (3, 0.75)):
        model.distiller.epoch, model.distiller.max_epochs = epoch, 4
        torch.manual_seed(0)
        losses = model(**model.data_preprocessor(copy.deepcopy(seg_batch), True), mode="loss")
        assert losses["decode.loss_ce"].item() == pytest.approx(alpha * own.item(), rel=1e-4)
    model.distiller.params["alw"] = False
    assert model.distiller.student_loss_weight() == 1.0


def test_cityscapes_suite_through_ray_gives_miou_rows(tmp_path):
    from harness.suite.load import load_suite
    from harness.run.matrix import run_suite
    path = tmp_path / "seg.yaml"
    path.write_text(SEG_SUITE.format(root=tmp_path / "cs", output=tmp_path / "results"))
    summary = run_suite(load_suite(path), num_cpus=2)
    assert not [t for t in summary["trials"] if t["error"]]
    df = pd.read_parquet(summary["results"])
    assert set(df["status"]) == {"ok"} and set(df["task"]) == {"seg"}
    assert set(df["method"]) == {"teacher", "none", "pixel_kd", "icsd"}
    assert set(df["metric"]) == {"mIoU", "mAcc", "aAcc"} and set(df[df["primary"]]["metric"]) == {"mIoU"}
    assert df["value"].between(0, 1).all()


def test_voc2012_layout_with_the_augmented_set_reads_through_mmseg(tmp_path):
    from mmengine.registry import DefaultScope
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    from harness.data.formats import VocSegFormat
    from harness.data.synth import VOC_SEG_CLASSES, write_voc_seg
    register_all_modules(init_default_scope=False)
    root = write_voc_seg(tmp_path / "VOC2012", train_images=3, val_images=2, image_size=32, aug_images=4, seed=2)
    assert (root / "ImageSets" / "Segmentation" / "aug.txt").read_text().split() and (root / "SegmentationClassAug").is_dir()
    fmt = VocSegFormat()
    with DefaultScope.overwrite_default_scope("mmseg"):
        plain = DATASETS.build(fmt.dataset({"root": str(root), "classes": None}, "train", [32, 32], [32, 32]))
        aug = DATASETS.build(fmt.dataset({"root": str(root), "classes": None, "aug": True}, "train", [32, 32], [32, 32]))
        val = DATASETS.build(fmt.dataset({"root": str(root), "classes": None}, "val", [32, 32]))
    assert (len(plain), len(aug), len(val)) == (3, 7, 2)
    assert fmt.classes({"classes": None}) == VOC_SEG_CLASSES and len(VOC_SEG_CLASSES) == 21
    sample = aug[6]["data_samples"].gt_sem_seg.data                    # from SegmentationClassAug
    assert set(sample.unique().tolist()) <= set(range(21)) | {255}
