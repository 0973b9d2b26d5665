"""What a trial does, checked through the real training path: ``run_trial`` builds the
model and mmengine's ``Runner.train()`` initialises it (``init_weights()``) before the
first iteration. A helper that works alone can be undone there, so these tests look at
the model as the first training step sees it."""
from __future__ import annotations

import json
import math

import pytest
import torch

from harness import catalog
from harness.suite.load import load_suite
from harness.run.trial import run_trial
from harness.run.weights import save_weights
from harness.suite.yamlio import SuiteError


@pytest.fixture
def first_step(monkeypatch):
    """Records the student's and teacher's weights when the Runner runs the first loss."""
    from harness.tasks import seg
    from harness.tasks.det import wrapper
    seen: dict = {}
    for cls in (wrapper.DistillationModel, seg.SegDistillationModel):
        original = cls.forward

        def forward(self, *args, _original=original, **kwargs):
            first = kwargs.get("mode", args[2] if len(args) > 2 else "tensor") == "loss" and "student" not in seen
            if first:
                seen["student"] = {k: v.detach().clone() for k, v in self.student.state_dict().items()}
                if self.teacher is not None:
                    seen["teacher"] = {k: v.detach().clone() for k, v in self.teacher.state_dict().items()}
                seen["requires_grad"] = {k: p.requires_grad for k, p in self.student.named_parameters()}
            out = _original(self, *args, **kwargs)
            if first:
                seen["losses"] = {k: float(sum(v) if isinstance(v, list) else v) for k, v in out.items()
                                  if "loss" in k}
            return out
        monkeypatch.setattr(cls, "forward", forward)
    return seen


def _teacher_checkpoint(spec) -> dict:
    """Write a teacher checkpoint for a student trial (as a finished teacher trial would)."""
    from harness.data.formats import ensure_dataset, num_classes
    from harness.tasks.det.models import build_detector, detector_cfg
    ensure_dataset(spec.dataset)
    torch.manual_seed(5)
    teacher = build_detector(detector_cfg(spec.teacher, num_classes(spec.dataset)))
    teacher.init_weights()
    for p in teacher.parameters():             # make every weight distinct from any initialisation
        p.data.add_(torch.randn_like(p) * 0.01)
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    save_weights(state, spec.teacher_checkpoint, {})
    return state


@pytest.mark.parametrize("inherit", [True, False])
def test_fgd_inherit_survives_the_runner_and_the_teacher_stays_loaded(write_suite, first_step, inherit):
    """FGD's inheriting strategy through Runner.train(): at the first iteration the
    student's neck and head equal the teacher's (and its backbone does not); without
    inherit they do not. The teacher is the checkpoint, frozen, before and after."""
    text = write_suite().read_text().replace("methods: [none, fgd]",
                                             f"methods: {{fgd: {{params: {{inherit: {str(inherit).lower()}}}}}}}")
    suite = load_suite(write_suite(text))
    spec = next(t for t in suite.trials if t.method == "fgd")
    saved = _teacher_checkpoint(spec)
    run_trial(spec, log_level="WARNING")
    student, teacher = first_step["student"], first_step["teacher"]
    head = [k for k in student if k.startswith(("neck.", "bbox_head."))]
    assert head
    same = [torch.equal(student[k], teacher[k]) for k in head]
    assert all(same) if inherit else not any(same)
    assert not torch.equal(student["backbone.conv1.weight"][:, :, :1], teacher["backbone.conv1.weight"][:, :, :1])
    assert all(torch.equal(teacher[k], saved[k]) for k in saved)          # loaded as saved, at step one
    # and after training: reload what the trial's teacher was and compare with the file
    from harness.tasks.det.task import build_trial_model
    from harness.run.weights import load_weights
    model, _ = build_trial_model(spec, load_weights)
    assert all(torch.equal(model.teacher.state_dict()[k], saved[k]) for k in saved)
    assert not any(p.requires_grad for p in model.teacher.parameters())


@pytest.mark.parametrize("method,params", [("gid", "{min_size: 2.0}"), ("gkp", "{pgm_min_box: 0.0}")])
def test_gid_and_gkp_train_through_the_runner(write_suite, first_step, method, params):
    """GID and GKP at the released defaults (but for the 64 px images' box thresholds)
    through run_trial / Runner.train(): the first step carries their finite losses, and
    the trial finishes with an evaluation."""
    text = write_suite().read_text().replace("methods: [none, fgd]", f"methods: {{{method}: {{params: {params}}}}}")
    spec = next(t for t in load_suite(write_suite(text)).trials if t.method == method)
    _teacher_checkpoint(spec)
    result = run_trial(spec, log_level="WARNING")
    mine = {k: v for k, v in first_step["losses"].items() if k.startswith(f"loss_{method}_")}
    assert mine and all(math.isfinite(v) for v in mine.values())
    assert "bbox_mAP" in result.metrics


def _backbone_file(tmp_path, base: int):
    from mmdet.models.backbones import ResNet
    torch.manual_seed(9)
    net = ResNet(depth=18, base_channels=base)
    # distinct from any initialisation, and a usable network: BN variances positive (a
    # negative one gives a NaN loss, which stops the trial as diverged), small weights
    state = {k: (torch.rand_like(v) + 0.5 if k.endswith("running_var") else torch.randn_like(v) * 0.05)
             if v.is_floating_point() else v for k, v in net.state_dict().items()}
    path = tmp_path / "r18-local.pth"
    torch.save({"state_dict": state}, path)
    return path, state


def test_pretrained_backbone_from_a_local_file_is_loaded_by_the_runner(write_suite, tmp_path, first_step):
    """``pretrained: <file>``: Runner.train() -> init_weights() loads the file into the
    student's backbone (mmengine's Pretrained init, as the configs do it), and the
    config's frozen stem / stage 1 and BN statistics apply (``frozen_stages=1``,
    ``norm_eval``)."""
    path, state = _backbone_file(tmp_path, 8)
    text = write_suite().read_text().replace(
        "    backbone: {depth: 18, base_channels: 8}", f"    pretrained: {path}\n    backbone: {{depth: 18, base_channels: 8}}")
    text = text.replace("methods: [none, fgd]", "methods: [none]")
    suite = load_suite(write_suite(text))
    spec = next(t for t in suite.trials if t.role == "student")
    assert spec.model["pretrained"] == str(path)
    run_trial(spec, log_level="WARNING")
    student = first_step["student"]
    assert all(torch.equal(student[f"backbone.{k}"], v) for k, v in state.items() if "num_batches" not in k)
    grads = first_step["requires_grad"]
    assert not grads["backbone.conv1.weight"] and not grads["backbone.layer1.0.conv1.weight"]   # frozen_stages=1
    assert grads["backbone.layer2.0.conv1.weight"]


def test_from_scratch_trains_every_stage(write_suite, first_step):
    """``pretrained: false`` (the synthetic suites): no checkpoint, every stage trains."""
    suite = load_suite(write_suite(write_suite().read_text().replace("methods: [none, fgd]", "methods: [none]")))
    spec = next(t for t in suite.trials if t.role == "student")
    run_trial(spec, log_level="WARNING")
    assert all(first_step["requires_grad"].values())


def test_missing_pretrained_file_is_a_clear_error_before_anything_trains(write_suite, tmp_path):
    text = write_suite().read_text().replace("pretrained: false", f"pretrained: {tmp_path}/nope.pth")
    with pytest.raises(SuiteError) as err:
        load_suite(write_suite(text))
    msg = str(err.value)
    assert "suite.yaml:3" in msg and "pretrained" in msg and "nope.pth" in msg and "is not a file" in msg
    assert not (tmp_path / "results").exists()


def test_configs_pretrained_backbones_follow_the_suites_backbone():
    """The bundled configs' checkpoints, frozen stage and BN statistics by default; depth
    and ResNeXt overrides pick the matching checkpoint; widths no checkpoint fits are an
    error that says what to set."""
    from harness.tasks.det.models import detector_cfg
    from harness.tasks.seg import segmentor_cfg
    r50 = detector_cfg({"name": "s", "arch": "retinanet"}, 80)["backbone"]
    assert r50["init_cfg"] == {"type": "Pretrained", "checkpoint": "torchvision://resnet50"}
    assert r50["frozen_stages"] == 1 and r50["norm_eval"] is True
    r101 = detector_cfg({"name": "t", "arch": "faster_rcnn", "backbone": {"depth": 101}}, 80)["backbone"]
    assert r101["init_cfg"]["checkpoint"] == "torchvision://resnet101"
    x101 = detector_cfg({"name": "t", "arch": "retinanet",
                         "backbone": {"type": "ResNeXt", "depth": 101, "groups": 64, "base_width": 4}}, 80)
    assert x101["backbone"]["init_cfg"]["checkpoint"] == "open-mmlab://resnext101_64x4d"
    fcos = detector_cfg({"name": "t", "arch": "fcos", "backbone": {"depth": 101}}, 80)["backbone"]
    assert fcos["init_cfg"]["checkpoint"] == "open-mmlab://detectron2/resnet101_caffe"   # the bundled R50's family
    assert segmentor_cfg({"name": "s", "arch": "deeplabv3plus_r18"}, 19, None)["pretrained"] == \
        "open-mmlab://resnet18_v1c"
    assert segmentor_cfg({"name": "t", "arch": "deeplabv3plus", "backbone": {"depth": 101}}, 19,
                         None)["pretrained"] == "open-mmlab://resnet101_v1c"
    with pytest.raises(ValueError, match="pretrained: false"):
        detector_cfg({"name": "w", "arch": "retinanet", "backbone": {"depth": 18, "base_channels": 16}}, 80)


def test_mixed_precision_and_loader_settings_reach_the_runner(write_suite, monkeypatch):
    """``schedule: {amp: true, amp_dtype: bfloat16, num_workers: 1, pin_memory: true}``
    through run_trial / Runner.train(): the Runner's optimiser wrapper is mmengine's
    AmpOptimWrapper casting to bf16; the student's and the teacher's forwards run under
    autocast in bf16, the teacher's without gradients; the loaders have the worker and
    pinned memory; the trial trains and evaluates. (AmpOptimWrapper refuses to be built
    without an accelerator, and a suite asks for a GPU with amp; the CPU's autocast does
    bf16, so the test lets the wrapper be built here: the same one a GPU run gets.)"""
    from mmengine.optim import AmpOptimWrapper
    from mmengine.optim.optimizer import amp_optimizer_wrapper
    from mmengine.runner import Runner

    from harness.tasks.det import wrapper
    monkeypatch.setattr(amp_optimizer_wrapper, "is_cuda_available", lambda: True)
    built: dict = {"loaders": []}
    build_optim_wrapper, build_dataloader = Runner.build_optim_wrapper, Runner.build_dataloader

    def optim(self, cfg):
        built["optim"] = build_optim_wrapper(self, cfg)
        return built["optim"]

    def loader(*args, **kwargs):
        built["loaders"].append(build_dataloader(*args, **kwargs))
        return built["loaders"][-1]
    monkeypatch.setattr(Runner, "build_optim_wrapper", optim)
    monkeypatch.setattr(Runner, "build_dataloader", staticmethod(loader))
    seen: dict = {}
    loss = wrapper.DistillationModel.loss

    def recording_loss(self, inputs, data_samples):
        if "student" not in seen:
            seen["student"] = (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            extract = self.teacher.extract_feat

            def teacher_extract(x):
                out = extract(x)
                seen["teacher"] = (torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"),
                                   out[0].dtype, out[0].requires_grad)
                return out
            self.teacher.extract_feat = teacher_extract
        return loss(self, inputs, data_samples)
    monkeypatch.setattr(wrapper.DistillationModel, "loss", recording_loss)

    text = (write_suite().read_text().replace("methods: [none, fgd]", "methods: [fgd]")
            .replace("img_scale: [64, 64]}", "img_scale: [64, 64], amp: true, amp_dtype: bfloat16, "
                                             "num_workers: 1, pin_memory: true}")
            .replace("resources: {cpu: 1, gpu: 0}", "resources: {cpu: 1, gpu: 1}"))
    spec = next(t for t in load_suite(write_suite(text)).trials if t.method == "fgd")
    _teacher_checkpoint(spec)
    # torch 2.14's oneDNN bf16 convolution backward on the CPU gives NaN weight gradients
    # now and then for a 1x1 input to a stride-2 3x3 convolution (RetinaNet's P7 on 64 px
    # images; about one call in three in isolation): torch's native CPU kernels here
    with torch.backends.mkldnn.flags(enabled=False):
        result = run_trial(spec, log_level="WARNING")
    assert isinstance(built["optim"], AmpOptimWrapper) and built["optim"].cast_dtype == torch.bfloat16
    assert seen["student"] == (True, torch.bfloat16)
    assert seen["teacher"] == (False, True, torch.bfloat16, False)      # no grad, autocast, bf16 out
    assert [(d.num_workers, d.pin_memory) for d in built["loaders"]] == [(1, True), (1, True)]   # train, val
    losses = json.loads((spec.trial_dir / "progress.json").read_text())["losses"]
    assert "bbox_mAP" in result.metrics and losses and all(math.isfinite(v) for v in losses)


def test_an_iteration_based_schedule_counts_epochs_as_passes_over_the_data(write_suite, monkeypatch):
    """``iters:`` instead of ``epochs:``: mmengine's IterBasedTrainLoop says epoch 0 of 1
    throughout; the distiller sees passes over the training data instead (4 images, a
    batch of 2, 7 iterations: epochs 0, 0, 1, 1, 2, 2, 3 of 4) and its per-epoch step
    (GKP's prototypes) runs at the start of each, over one pass of the data."""
    from harness.tasks.det.wrapper import DistillationModel
    text = write_suite().read_text().replace("methods: [none, fgd]", "methods: {gkp: {params: {pgm_min_box: 0.0}}}")
    text = text.replace("train_images: 8", "train_images: 4").replace(
        "epochs: 1, val_interval: 1, batch_size: 4", "iters: 7, val_interval: 7, batch_size: 2")
    spec = next(t for t in load_suite(write_suite(text)).trials if t.method == "gkp")
    _teacher_checkpoint(spec)
    seen, steps = [], []
    forward = catalog.METHODS.load("gkp").forward
    prepare = DistillationModel.prepare_epoch

    def record(self, batch):
        seen.append((self.epoch, self.max_epochs))
        return forward(self, batch)

    def prepare_epoch(self, loader):
        images = sum(len(data["inputs"]) for data in loader)
        steps.append((self.distiller.epoch, images))
        return prepare(self, loader)
    monkeypatch.setattr(catalog.METHODS.load("gkp"), "forward", record)
    monkeypatch.setattr(DistillationModel, "prepare_epoch", prepare_epoch)
    run_trial(spec, log_level="WARNING")
    assert seen == [(0, 4), (0, 4), (1, 4), (1, 4), (2, 4), (2, 4), (3, 4)]
    assert steps == [(0, 4), (1, 4), (2, 4), (3, 4)]
