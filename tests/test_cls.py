"""Classification in the harness: ImageNet-style folders, top-k metric, SSLD and Hinton KD
inside the model mmengine trains, and a tiny suite through Ray Tune."""
from __future__ import annotations

import copy

import pandas as pd
import pytest
import torch

from harness import catalog
from harness.data.synth import SHAPES, write_imagenet

from .conftest import (THROWAWAY, check_distiller_losses, check_gradients_reach_student_and_distiller_only,
                       train_with_frozen_teacher)

CLS_SUITE = """
name: cls-tiny
datasets:
  shapes-cls:
    format: imagenet
    root: {root}
    synth: {{train_images: 6, val_images: 3, image_size: 32, unlabeled_images: 8, seed: 0}}
teachers:
  r18: {{arch: resnet18}}
students:
  mnv3: {{arch: mobilenet_v3_small}}
pairs: [[r18, mnv3]]
methods:
  hinton_kd: {{}}
  ssld: {{params: {{mine_topk: 1, finetune_epochs: 1}}}}
  ssld-bn: {{method: ssld, params: {{teacher_mode: train}}}}
seeds: [0]
schedule: {{epochs: 1, val_interval: 1, batch_size: 8, lr: 0.05, warmup_iters: 0, img_scale: [32, 32]}}
resources: {{cpu: 1, gpu: 0}}
output: {output}
"""


@pytest.fixture(scope="module")
def cls_root(tmp_path_factory):
    return write_imagenet(tmp_path_factory.mktemp("cls") / "shapes", train_images=4, val_images=2,
                          image_size=32, unlabeled_images=5, seed=1)


def test_imagenet_layout(cls_root):
    assert sorted(p.name for p in cls_root.iterdir()) == [".kd-synth.json", "train", "unlabeled", "val"]
    assert sorted(p.name for p in (cls_root / "train").iterdir()) == sorted(SHAPES)
    assert len(list((cls_root / "val" / "disc").glob("*.jpg"))) == 2
    assert len(list((cls_root / "unlabeled").glob("*.jpg"))) == 5


def test_image_folder_labels_and_unlabeled(cls_root):
    from harness.data.folders import ImageFolder, folder_classes
    classes = folder_classes(cls_root)
    assert classes == tuple(sorted(SHAPES))
    ds = ImageFolder(cls_root, "train", classes, 24, train=True, unlabeled="unlabeled")
    labels = [label for _, label in ds.items]
    assert labels.count(-1) == 5 and sorted(set(labels)) == [-1, 0, 1, 2, 3]
    sample = ds[0]
    assert sample["inputs"].shape == (3, 24, 24) and sample["inputs"].dtype == torch.uint8


def test_topk_accuracy_by_hand():
    from harness.tasks.cls import TopKAccuracy
    metric = TopKAccuracy()
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.0, 0.0, 0.0], [0.5, 0.1, 0.2, 0.3, 0.4, 0.0]])
    metric.process({}, [{"logits": logits[0], "label": 1}, {"logits": logits[1], "label": 5}])
    assert metric.compute_metrics(metric.results) == {"top1": 0.5, "top5": 0.5}


def _model(method):
    from harness.tasks.cls import ClassifierModel, build_net, model_info
    torch.manual_seed(0)
    s_entry, t_entry = {"arch": "mobilenet_v3_small"}, {"arch": "resnet18"}
    student = build_net(s_entry, 4)
    teacher = build_net(t_entry, 4)
    if method == "none":
        return ClassifierModel(student)
    distiller = catalog.METHODS.load(method)(catalog.method_params(method, "cls"), model_info(s_entry, student, {}, 4),
                                             model_info(t_entry, teacher, {}, 4))
    return ClassifierModel(student, teacher, distiller)


def _batch(cls_root, labels):
    from harness.data.folders import ImageFolder, folder_classes
    ds = ImageFolder(cls_root, "val", folder_classes(cls_root), 32, train=False)
    return {"inputs": [ds[i]["inputs"] for i in range(len(labels))], "data_samples": list(labels)}


def _loss(model, batch):
    torch.manual_seed(0)                     # the same dropout masks for both calls
    return model(**model.data_preprocessor(batch, True), mode="loss")


def test_ssld_ignores_labels(cls_root):
    model = _model("ssld").train()
    a = _loss(model, _batch(cls_root, [0, 1, 2, 3]))
    b = _loss(model, _batch(cls_root, [3, 3, 0, 1]))
    assert set(a) == {"loss_ssld"}
    assert torch.equal(a["loss_ssld"], b["loss_ssld"])
    hinton = _model("hinton_kd").train()
    c = _loss(hinton, _batch(cls_root, [0, 1, 2, 3]))
    d = _loss(hinton, _batch(cls_root, [3, 3, 0, 1]))
    assert not torch.equal(c["loss_ce"], d["loss_ce"]) and torch.equal(c["loss_kd"], d["loss_kd"])


CLS_METHODS = [m.name for m in catalog.METHODS if m.target and "cls" in m["tasks"]]


@pytest.mark.parametrize("method", CLS_METHODS)
def test_cls_distiller_trains_and_teacher_is_unchanged(method, cls_root):
    model = _model(method).train()
    assert not model.teacher.training

    def losses():
        out = model(**model.data_preprocessor(_batch(cls_root, [0, 1, -1, 3]), True), mode="loss")
        check_distiller_losses(out, set())      # a classification distiller returns every loss
        return out
    train_with_frozen_teacher(model, losses, lr=0.1)
    check_gradients_reach_student_and_distiller_only(model)
    assert model.distiller.task == "cls" and model.distiller.student_info.num_classes == 4


def test_the_loop_picks_up_a_method_registered_from_the_tests():
    assert THROWAWAY["cls"] in CLS_METHODS


@pytest.fixture(scope="module")
def cls_e2e(tmp_path_factory):
    from harness.suite.load import load_suite
    from harness.run.matrix import run_suite
    tmp = tmp_path_factory.mktemp("cls_e2e")
    path = tmp / "cls.yaml"
    path.write_text(CLS_SUITE.format(root=tmp / "shapes", output=tmp / "results"))
    suite = load_suite(path)
    return suite, run_suite(suite, num_cpus=2)


def test_cls_suite_through_ray_gives_top1_rows(cls_e2e):
    suite, summary = cls_e2e
    assert not [t for t in summary["trials"] if t["error"]]
    df = pd.read_parquet(summary["results"])
    assert set(df["status"]) == {"ok"} and set(df["task"]) == {"cls"}
    assert set(df["method"]) == {"teacher", "none", "hinton_kd", "ssld", "ssld-bn"}
    # a teacher run on batch statistics (PaddleClas' way) is still the teacher that was evaluated
    teacher_hash = set(df[df["role"] == "teacher"]["teacher_weights_hash"])
    assert set(df[df["method"] == "ssld-bn"]["teacher_weights_hash"]) == teacher_hash
    assert set(df[df["primary"]]["metric"]) == {"top1"}
    assert df["value"].between(0, 1).all()
    ssld = df[df["method"] == "ssld"]
    assert set(ssld["epoch"]) == {2}                     # 1 epoch + the 1-epoch fine-tune stage


def test_a_trial_builds_the_same_initial_weights_for_the_same_seed(tmp_path):
    """Models are built before mmengine's Runner seeds anything; the trial seeds first."""
    from harness.tasks.cls import prepare_trial
    from harness.data.formats import ensure_dataset
    from harness.suite.load import load_suite
    from harness.run.trial import seed_trial
    from harness.run.weights import load_weights
    path = tmp_path / "cls.yaml"
    path.write_text(CLS_SUITE.format(root=tmp_path / "shapes", output=tmp_path / "results"))
    spec = [t for t in load_suite(path).trials if t.method == "none"][0]
    ensure_dataset(spec.dataset)
    weights = []
    for seed in (0, 0, 1):
        spec.seed = seed
        seed_trial(spec)
        weights.append(prepare_trial(spec, load_weights)["model"].student_state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], weights[2][k]) for k in weights[0])


def test_ssld_teacher_mode_train_uses_batch_statistics_and_keeps_the_teacher_unchanged():
    """PaddleClas runs SSLD's teacher in train mode (BN batch statistics): offered as
    ``teacher_mode: train``; the teacher's stored weights and statistics stay those of
    the teacher that was evaluated (its hash unchanged), and the default stays eval."""
    import torch
    from torch import nn

    from harness.run.weights import weights_hash
    from harness.tasks.teacher_student import TeacherStudentModel
    from methods._base import ModelInfo
    from methods.ssld import SSLD

    def net():
        return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 3))
    info = ModelInfo(arch="tiny", family="cls", channels=[], strides=[], task="cls", num_classes=3)
    x = torch.randn(6, 3, 8, 8) * 3 + 1
    for mode, batch_stats in (("eval", False), ("train", True)):
        teacher = net()
        before = weights_hash(teacher.state_dict())
        distiller = SSLD({"weight": 1.0, "teacher_mode": mode}, info, info)
        model = type("Model", (TeacherStudentModel,), {"forward": lambda self, *a, **k: None})(
            net(), teacher, distiller, nn.Identity())
        model.train()
        assert model.teacher.training == batch_stats
        with torch.no_grad():
            out = model.teacher(x)
        model.eval()
        with torch.no_grad():
            evaluated = model.teacher(x)
        assert torch.allclose(out, evaluated) != batch_stats       # batch statistics differ from the stored ones
        assert weights_hash(model.teacher.state_dict()) == before   # nothing of the teacher changed
