"""Benchmark: the distillation part of a detection training step, per distiller.

Realistic shapes: batch 2, input 800x1333, five FPN levels of 256 channels, 30 boxes
per image. Student RetinaNet R50 and teacher RetinaNet R101 (Faster R-CNN R50/R101 with
--two-stage), both at mmdet's real widths, untrained (timing does not depend on weights).

Printed per distiller, median of --reps runs after one warm-up, in milliseconds:
  student step   the student's own loss forward + backward (no distillation)
  teacher fwd    the frozen teacher's forward (features, and head outputs when needed)
  distill        the distiller's loss forward + backward, on the features above
                 (a before-epoch step such as GKP's PGM runs once beforehand, untimed)
  ratio          distill / student step

Run by hand:  .venv/bin/python bench/det_distill_step.py [--device cuda] [--reps 5]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import catalog  # noqa: E402
from harness.tasks.det.dense import dense_head, head_outputs  # noqa: E402
from harness.tasks.det.models import build_detector, detector_cfg, tapped_info  # noqa: E402
from methods._base import DetBatch  # noqa: E402


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str, reps: int) -> float:
    fn()                                   # warm-up
    sync(device)
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def make_batch(device: str, n: int = 2, boxes: int = 30, h: int = 800, w: int = 1333):
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    g = torch.Generator().manual_seed(0)
    inputs = torch.randn(n, 3, 800, 1344, generator=g).to(device)   # padded to a multiple of 32
    samples = []
    for _ in range(n):
        xy = torch.rand(boxes, 2, generator=g) * torch.tensor([w - 64.0, h - 64.0])
        wh = 16 + torch.rand(boxes, 2, generator=g) * 300
        bb = torch.cat([xy, (xy + wh).minimum(torch.tensor([w - 1.0, h - 1.0]))], dim=1)
        s = DetDataSample(metainfo={"img_shape": (h, w), "pad_shape": (800, 1344), "batch_input_shape": (800, 1344),
                                    "scale_factor": (1.0, 1.0), "ori_shape": (h, w)})
        s.gt_instances = InstanceData(bboxes=bb.to(device), labels=torch.randint(0, 80, (boxes,), generator=g).to(device))
        samples.append(s)
    return inputs, samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--two-stage", action="store_true", help="Faster R-CNN R101 -> R50 instead of RetinaNet")
    parser.add_argument("--methods", nargs="*", default=[m.name for m in catalog.METHODS
                                                          if m.target and "det" in m["tasks"]])
    args = parser.parse_args()
    arch = "faster_rcnn" if args.two_stage else "retinanet"
    s_model = {"name": "s", "arch": arch, "backbone": {"depth": 50}}
    t_model = {"name": "t", "arch": arch, "backbone": {"depth": 101}}
    s_cfg, t_cfg = detector_cfg(s_model, 80), detector_cfg(t_model, 80)
    student, teacher = build_detector(s_cfg).to(args.device), build_detector(t_cfg).to(args.device)
    teacher.eval()
    inputs, samples = make_batch(args.device)
    levels = len(catalog.ARCHS.get(arch)["levels"])
    torch.set_grad_enabled(True)

    def student_step() -> None:
        losses = student.loss(inputs, samples)
        sum(v if isinstance(v, torch.Tensor) else sum(v) for v in losses.values()).backward()
        student.zero_grad(set_to_none=True)

    t_student = timed(student_step, args.device, args.reps)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{arch}: student R50, teacher R101, batch 2 at 800x1333, 30 boxes/image, on {device_name}")
    print(f"{'method':<14}{'student step':>14}{'teacher fwd':>13}{'distill':>10}{'ratio':>8}")
    with torch.no_grad():
        s_feats = [f.detach() for f in student.extract_feat(inputs)]
        s_raw = dense_head(student)(s_feats)
    for method in args.methods:
        params = catalog.method_params(method, catalog.ARCHS.get(arch)["family"])
        distiller = catalog.METHODS.load(method)(params, tapped_info(s_model, s_cfg),
                                                 tapped_info(t_model, t_cfg)).to(args.device)
        needs_head = getattr(distiller, "needs_head_outputs", False)

        def teacher_fwd():
            with torch.no_grad():
                feats = teacher.extract_feat(inputs)
                raw = dense_head(teacher)(feats) if needs_head else None
            return feats, raw

        t_teacher = timed(teacher_fwd, args.device, args.reps)
        t_feats, t_raw = teacher_fwd()
        if hasattr(distiller, "before_epoch"):    # once per epoch, not per step: untimed, so
            distiller.before_epoch([DetBatch.from_data_samples(  # the step runs with prototypes
                s_feats[:levels], list(t_feats)[:levels], samples)])

        def distill() -> None:
            feats = [f.clone().requires_grad_(True) for f in s_feats]
            batch = DetBatch.from_data_samples(feats[:levels], list(t_feats)[:levels], samples)
            if needs_head:
                raw = tuple([m.clone().requires_grad_(True) for m in part] for part in s_raw)
                batch.student_head = head_outputs(student, raw)
                batch.teacher_head = head_outputs(teacher, t_raw)
            sum(distiller(batch).values()).backward()
            distiller.zero_grad(set_to_none=True)

        t_distill = timed(distill, args.device, args.reps)
        print(f"{method:<14}{t_student:>14.0f}{t_teacher:>13.0f}{t_distill:>10.0f}{t_distill / t_student:>8.2f}")


if __name__ == "__main__":
    main()
