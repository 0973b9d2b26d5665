"""Classification in the same engine: torchvision models trained by mmengine's Runner on
ImageNet-style folders, evaluated by top-1 / top-5.

- images come from :class:`harness.data.folders.ImageFolder` (class folders, and
  optionally an unlabeled folder whose images get the label -1);
- :class:`ClassifierModel`: an mmengine ``BaseModel`` holding the student, an optional
  frozen teacher and an optional distiller; without a distiller the loss is the
  cross-entropy on labelled images (unlabelled ones are ignored), with one the
  distiller decides (SSLD uses no label at all);
- :class:`TopKAccuracy`: top-1 and top-5 accuracy in [0, 1].
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from mmengine.evaluator import BaseMetric
from mmengine.model import ImgDataPreprocessor
from torch import nn

from harness.data.folders import ImageFolder, unlabeled_files
from methods._base import ClsBatch, Distiller, ModelInfo

from .teacher_student import TeacherStudentModel

MEAN, STD = [123.675, 116.28, 103.53], [58.395, 57.12, 57.375]     # ImageNet, RGB, 0-255


def build_net(model: dict[str, Any], num_classes: int) -> nn.Module:
    """A torchvision classifier from scratch (``weights=None``) with ``num_classes`` outputs."""
    from torchvision import models

    from harness import catalog
    arch = catalog.arch_of(model)
    kwargs = dict(model.get("model", {}))
    return models.get_model(arch["torchvision"], weights=None, num_classes=num_classes, **kwargs)


class ClassifierModel(TeacherStudentModel):
    """Student (+ frozen teacher + distiller) for classification, driven by the Runner."""

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None,
                 distiller: Distiller | None = None) -> None:
        super().__init__(student, teacher, distiller, ImgDataPreprocessor(mean=MEAN, std=STD))

    def init_weights(self) -> None:
        """torchvision initialises its models when built; the teacher keeps its weights."""

    def teacher_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.teacher(inputs)

    def forward(self, inputs: torch.Tensor, data_samples: Any = None, mode: str = "tensor") -> Any:
        logits = self.student(inputs)
        if mode == "tensor":
            return logits
        labels = torch.as_tensor(list(data_samples), device=logits.device)
        if mode == "predict":
            return [{"logits": z.detach(), "label": int(y)} for z, y in zip(logits, labels)]
        if mode != "loss":
            raise ValueError(f"invalid mode '{mode}': expected loss, predict or tensor")
        if self.distiller is None:
            return {"loss_ce": F.cross_entropy(logits, labels, ignore_index=-1)}
        return self.distiller(ClsBatch(logits, self.teacher_logits(inputs), labels))


class TopKAccuracy(BaseMetric):
    """Top-1 and top-5 accuracy (top-5 is top-k with k = the class count when fewer)."""

    default_prefix = "cls"

    def process(self, data_batch: Any, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            k = min(5, s["logits"].numel())
            top = s["logits"].topk(k).indices.tolist()
            self.results.append((s["label"], top))

    def compute_metrics(self, results: list) -> dict[str, float]:
        n = max(1, len(results))
        return {"top1": sum(label == top[0] for label, top in results) / n,
                "top5": sum(label in top for label, top in results) / n}


def build_model(model: dict[str, Any], num_classes: int, schedule: dict[str, Any]) -> tuple[nn.Module, dict[str, Any]]:
    """A suite model entry built as a torchvision classifier (no mmengine config)."""
    return build_net(model, num_classes), {}


def model_info(model: dict[str, Any], net: nn.Module | None, cfg: dict[str, Any], num_classes: int,
               all_levels: bool = False) -> ModelInfo:
    """:class:`methods._base.ModelInfo` of a classifier: a classification distiller is
    handed logits only (no feature maps), ``num_classes`` wide."""
    from harness import catalog
    return ModelInfo(arch=model["arch"], family=catalog.arch_of(model)["family"], channels=[], strides=[],
                     task="cls", num_classes=num_classes)


# ------------------------------------------------------------------------------- trials
def _loader(dataset: torch.utils.data.Dataset, batch_size: int, workers: int, train: bool,
            pin_memory: bool = False, infinite: bool = False, seed: int = 0) -> Any:
    from mmengine.dataset import DefaultSampler, InfiniteSampler, pseudo_collate
    # training drops an incomplete last batch (a batch of one breaks BatchNorm, e.g. in
    # MobileNetV3's squeeze-excite blocks), unless that would leave no batch at all
    drop_last = train and len(dataset) > batch_size
    sampler = None
    if train:
        # mmengine's samplers, as the detection and segmentation loaders: one permutation
        # (seeded by the trial's seed, and by the epoch through DistSamplerSeedHook) which
        # a data-parallel worker takes every n-th index of, so that n workers' global
        # batch is the batch one worker would see; an iteration-based schedule gets one
        # endless stream (a finite loader is restarted by mmengine at each end with a 2 s
        # pause, which made such trials 4x slower here)
        sampler = (InfiniteSampler if infinite else DefaultSampler)(dataset, shuffle=True, seed=seed)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                       sampler=sampler, num_workers=workers, collate_fn=pseudo_collate,
                                       drop_last=drop_last, persistent_workers=workers > 0, pin_memory=pin_memory)


@torch.no_grad()
def mine_unlabeled(teacher: nn.Module, files: list[Path], root: str, folder: str, classes: Sequence[str],
                   size: int, k: int, batch_size: int) -> list[Path]:
    """SSLD's mining: label the unlabeled images with the teacher, keep the top-k most
    confident per class."""
    from methods.ssld import mine_confident

    data = ImageFolder(root, "val", [], size, train=False, unlabeled=folder, files=files)
    pre = ImgDataPreprocessor(mean=MEAN, std=STD)
    probs = []
    for batch in _loader(data, batch_size, 0, train=False):
        inputs = pre({"inputs": batch["inputs"]}, False)["inputs"]
        probs.append(F.softmax(teacher(inputs), dim=1))
    if not probs:
        return []
    keep = mine_confident(torch.cat(probs), k).tolist()
    return [files[i] for i in sorted(keep)]


def prepare_trial(spec: Any, load_weights: Any) -> dict[str, Any]:
    """Model, loaders and evaluator of a classification trial (and a fine-tune loader
    for SSLD's second stage)."""
    from mmengine.evaluator import Evaluator

    from harness import catalog
    from harness.data.formats import dataset_format

    ds, sched = spec.dataset, spec.schedule
    classes = dataset_format(ds).classes(ds)
    size = int(sched["img_scale"][0])
    student = build_net(spec.model, len(classes))
    teacher = distiller = None
    distilled = spec.role == "student" and spec.method_name != "none"
    if distilled:
        teacher = build_net(spec.teacher, len(classes))
        load_weights(teacher, spec.teacher_checkpoint)
        teacher.eval()
        distiller = catalog.METHODS.load(spec.method_name)(spec.params, model_info(spec.model, student, {},
                                                           len(classes)), model_info(spec.teacher, teacher, {}, len(classes)))
    p = spec.params
    unlabeled = ds.get("unlabeled") if distilled and p.get("unlabeled") else None
    files = None
    if unlabeled and p.get("mine_topk"):
        files = mine_unlabeled(teacher, unlabeled_files(ds["root"], unlabeled), ds["root"], unlabeled,
                               classes, size, int(p["mine_topk"]), sched["batch_size"])
    train = ImageFolder(ds["root"], "train", classes, size, train=True, unlabeled=unlabeled, files=files)
    val = ImageFolder(ds["root"], "val", classes, size, train=False)
    out = {"model": ClassifierModel(student, teacher, distiller), "model_cfg": {"arch": spec.model["arch"],
           "model": spec.model.get("model", {}), "num_classes": len(classes), "classes": list(classes)},
           "train_loader": _loader(train, sched["batch_size"], sched["num_workers"], True, sched.get("pin_memory", False),
                                   infinite=bool(sched.get("iters")), seed=spec.seed),
           "val_loader": _loader(val, sched["batch_size"], sched["num_workers"], False, sched.get("pin_memory", False)),
           "evaluator": Evaluator([TopKAccuracy()]), "finetune_loader": None}
    if distilled and p.get("finetune_epochs"):
        labelled = ImageFolder(ds["root"], "train", classes, size, train=True)
        out["finetune_loader"] = _loader(labelled, sched["batch_size"], sched["num_workers"], True,
                                         sched.get("pin_memory", False), seed=spec.seed)
    return out
