"""Every registered distiller of every task under mixed precision and in float64.

The batch each distiller receives is captured from its task's real model (tiny, fp32),
then handed to the distiller again:

- under ``torch.autocast`` in bfloat16 (and float16, where this CPU's autocast has
  it), the features and logits in that dtype as autocast leaves them: the losses are
  finite and the gradients reaching the student's tensors have their dtype;
- in float64 (inputs and the distiller's parameters): finite losses, float64
  gradients, and no operation produces a floating tensor of another dtype (a tensor
  the distiller makes must take its dtype from its inputs: GKP's float32 weights broke
  bf16 autocast and float64 with "Index put requires the source and destination dtypes
  match"), and every tensor factory it calls is told its device.

Grows with the registry, as the task loops do.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
from unittest import mock

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from harness import catalog

DET = [m.name for m in catalog.METHODS if m.target and "det" in m["tasks"]]
SEG = [m.name for m in catalog.METHODS if m.target and "seg" in m["tasks"]]
CLS = [m.name for m in catalog.METHODS if m.target and "cls" in m["tasks"]]
#: the tensors of a batch that come from the student (they get the gradients)
STUDENT_FIELDS = ("student_feats", "student_logits", "student_head_logits", "student_head", "cls", "reg")
FACTORIES = ("zeros", "ones", "full", "empty", "arange", "tensor", "eye", "linspace", "rand", "randn")


def _fp16_autocast_on_cpu() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return torch.nn.functional.conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 1, 1)).dtype == torch.float16
    except (RuntimeError, TypeError):
        return False


AUTOCAST = [torch.bfloat16] + ([torch.float16] if _fp16_autocast_on_cpu() else [])


def _cast(obj, dtype, leaves, student=False, field=""):
    """A copy of a batch (dataclasses, lists, tensors) with its floating tensors in
    ``dtype``; the student's become leaves that record their gradients."""
    student = student or field in STUDENT_FIELDS
    if isinstance(obj, torch.Tensor):
        if not obj.is_floating_point():
            return obj
        out = obj.detach().to(dtype)
        if student:
            out.requires_grad_(True)
            leaves.append(out)
        return out
    if isinstance(obj, list):
        return [_cast(x, dtype, leaves, student, field) for x in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        kept = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **{k: (v if k == "data_samples" else _cast(v, dtype, leaves, student, k))
                                           for k, v in kept.items()})
    return obj


class _Dtypes(TorchDispatchMode):
    """Records every operation whose floating output is not ``want``."""

    def __init__(self, want):
        super().__init__()
        self.want, self.mixed = want, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != self.want:
                self.mixed.append(f"{func} -> {t.dtype}")
        return out


@contextlib.contextmanager
def _factories_without_device(calls):
    """Records each call of a torch tensor factory that does not say its device."""
    patches = []
    for name in FACTORIES:
        original = getattr(torch, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            if "device" not in kwargs:
                calls.append(_name)
            return _original(*args, **kwargs)
        patches.append(mock.patch.object(torch, name, wrapped))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        yield


def _check(distiller, batch, dtype, autocast: bool):
    distiller = copy.deepcopy(distiller)
    if not autocast:
        distiller = distiller.to(dtype)
    leaves: list[torch.Tensor] = []
    cast = _cast(batch, dtype, leaves)
    watch, calls = _Dtypes(dtype), []
    context = torch.autocast("cpu", dtype=dtype) if autocast else watch
    with context, _factories_without_device(calls):
        out = distiller(cast)
    assert out and all(k.startswith("loss_") for k in out)
    for k, v in out.items():
        assert torch.isfinite(v).all(), f"{k} is {v} in {dtype}"
    total = sum(v.float().sum() if autocast else v.sum() for v in out.values())
    total.backward()
    reached = [t for t in leaves if t.grad is not None]
    assert reached, "no gradient reached the student's tensors"
    assert all(t.grad.dtype == dtype for t in reached), {t.grad.dtype for t in reached}
    if not autocast:
        assert not watch.mixed, f"operations leaving {dtype}: {sorted(set(watch.mixed))[:8]}"
        assert not calls, f"tensor factories called without a device: {sorted(set(calls))}"


def _recorded(model, run):
    """The batch the model hands its distiller during ``run()``."""
    seen = []
    original = model.distiller.forward

    def forward(batch):
        seen.append(batch)
        return original(batch)
    model.distiller.forward = forward
    run()
    model.distiller.forward = original
    assert seen, "the distiller was not called"
    return seen[0]


# ---------------------------------------------------------------------------- detection
@pytest.fixture(scope="module")
def det_batches(det_batch):
    from .test_distillers import _distilled, _losses
    out = {}
    for method in DET:
        for arch in ("retinanet", "faster_rcnn"):
            model, _ = _distilled(method, arch, det_batch)
            out[method, arch] = (model.distiller, _recorded(model, lambda: _losses(model, det_batch)))
    return out


@pytest.mark.parametrize("arch", ["retinanet", "faster_rcnn"])
@pytest.mark.parametrize("method", DET)
@pytest.mark.parametrize("dtype", AUTOCAST + [torch.float64], ids=str)
def test_det_distillers_in_every_precision(method, arch, dtype, det_batches):
    distiller, batch = det_batches[method, arch]
    _check(distiller, batch, dtype, autocast=dtype != torch.float64)


# ------------------------------------------------------------------------- segmentation
@pytest.fixture(scope="module")
def seg_batches(tmp_path_factory):
    from mmengine.registry import DefaultScope
    from mmseg.datasets import CityscapesDataset
    from mmseg.utils import register_all_modules

    from harness.data.formats import CityscapesFormat
    from harness.data.synth import write_cityscapes

    from .test_seg import _model
    register_all_modules(init_default_scope=False)
    root = write_cityscapes(tmp_path_factory.mktemp("seg-precision") / "cs", train_images=2, val_images=1,
                            image_size=32)
    cfg = CityscapesFormat().dataset({"root": str(root), "classes": None}, "train", [64, 32], [32, 32])
    cfg.pop("type")
    with DefaultScope.overwrite_default_scope("mmseg"):
        ds = CityscapesDataset(**cfg)
        samples = [ds[i] for i in range(2)]
    data = {"inputs": [s["inputs"] for s in samples], "data_samples": [s["data_samples"] for s in samples]}
    out = {}
    for method in SEG:
        model = _model(method).train()
        model.distiller.epoch, model.distiller.max_epochs = 1, 2
        out[method] = (model.distiller, _recorded(
            model, lambda: model(**model.data_preprocessor(copy.deepcopy(data), True), mode="loss")))
    return out


@pytest.mark.parametrize("method", SEG)
@pytest.mark.parametrize("dtype", AUTOCAST + [torch.float64], ids=str)
def test_seg_distillers_in_every_precision(method, dtype, seg_batches):
    distiller, batch = seg_batches[method]
    _check(distiller, batch, dtype, autocast=dtype != torch.float64)


# ------------------------------------------------------------------------ classification
@pytest.fixture(scope="module")
def cls_batches(tmp_path_factory):
    from harness.data.synth import write_imagenet

    from .test_cls import _batch, _model
    root = write_imagenet(tmp_path_factory.mktemp("cls-precision") / "shapes", train_images=4, val_images=2,
                          image_size=32, unlabeled_images=5, seed=1)
    out = {}
    for method in CLS:
        model = _model(method).train()
        out[method] = (model.distiller, _recorded(
            model, lambda: model(**model.data_preprocessor(_batch(root, [0, 1, -1, 3]), True), mode="loss")))
    return out


@pytest.mark.parametrize("method", CLS)
@pytest.mark.parametrize("dtype", AUTOCAST + [torch.float64], ids=str)
def test_cls_distillers_in_every_precision(method, dtype, cls_batches):
    distiller, batch = cls_batches[method]
    _check(distiller, batch, dtype, autocast=dtype != torch.float64)


def test_the_checks_catch_a_distiller_that_makes_float32():
    """The float64 check on a distiller that builds a float32 weight (GKP's old bug)."""
    from methods._base import ClsBatch, Distiller

    class Sloppy(Distiller):
        def forward(self, batch):
            w = torch.ones(len(batch.labels))                   # float32, default device
            return {"loss_x": (w * batch.student_logits.sum(1)).sum()}
    batch = ClsBatch(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    with pytest.raises(AssertionError, match="operations leaving torch.float64|without a device"):
        _check(Sloppy({}, None, None), batch, torch.float64, autocast=False)
