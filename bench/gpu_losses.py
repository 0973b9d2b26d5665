"""Every registered distiller's losses on CUDA against the CPU: the same inputs (synthetic
batches of each task at realistic shapes), the same parameters, compared in float32
(relative 1e-4) and under bf16 autocast (relative 5e-2, against the CPU's float32).
Needs only torch and torchvision (the distillers import nothing else), so it runs on a
GPU machine that has PyTorch and nothing of OpenMMLab's stack.

Run by hand:  python bench/gpu_losses.py          (prints one line per distiller and dtype)
              python bench/gpu_losses.py --self-test   (CPU against CPU, where there is no GPU)
"""
from __future__ import annotations

import copy
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from harness import catalog  # noqa: E402
from methods._base import ClsBatch, DetBatch, HeadOutputs, ModelInfo, SegBatch  # noqa: E402

STRIDES = [8, 16, 32, 64, 128]


def _det_batch(g: torch.Generator) -> tuple[DetBatch, ModelInfo, ModelInfo]:
    n, c, size, boxes_per = 2, 256, 512, 12
    feats = lambda: [torch.randn(n, c, size // s, size // s, generator=g) for s in STRIDES]  # noqa: E731
    xy = torch.rand(n, boxes_per, 2, generator=g) * (size - 80)
    wh = 16 + torch.rand(n, boxes_per, 2, generator=g) * 64
    boxes = torch.cat([xy, xy + wh], dim=-1)
    labels = torch.randint(0, 4, (n, boxes_per), generator=g)
    batch = DetBatch(feats(), feats(), boxes, torch.ones(n, boxes_per, dtype=torch.bool), labels,
                     torch.full((n, 2), float(size)))
    # dense-head outputs (RetinaNet-like: 9 anchors per cell, 4 classes) for GID
    cells = sum((size // s) ** 2 for s in STRIDES)
    anchors = torch.rand(cells * 9, 2, generator=g) * size
    priors = torch.cat([anchors, anchors + 32], dim=1)
    head = lambda: HeadOutputs(cls=torch.randn(n, len(priors), 4, generator=g),  # noqa: E731
                               reg=torch.randn(n, len(priors), 4, generator=g) * 0.1, priors=priors,
                               boxes=priors[None].repeat(n, 1, 1), points_only=False, pos_iou=0.5)
    batch.student_head, batch.teacher_head = head(), head()
    layout = {"type": "RetinaHead", "num_classes": 4, "priors": {"strides": STRIDES}}
    info = ModelInfo("retinanet", "one_stage", [c] * 5, STRIDES, layout, task="det", num_classes=4)
    return batch, info, copy.deepcopy(info)


def _seg_batch(g: torch.Generator) -> tuple[SegBatch, ModelInfo, ModelInfo]:
    n, k, h, w = 2, 19, 128, 256
    s, t = torch.randn(n, k, h, w, generator=g), torch.randn(n, k, h, w, generator=g)
    labels = torch.randint(0, k, (n, h, w), generator=g)
    labels[:, :8] = 255
    batch = SegBatch(s, t, labels, s[:, :, ::8, ::8].contiguous(), t[:, :, ::8, ::8].contiguous(),
                     [torch.randn(n, 512, h // 8, w // 8, generator=g)], [torch.randn(n, 2048, h // 8, w // 8, generator=g)])
    return (batch, ModelInfo("deeplabv3plus_r18", "seg", [512], [8], task="seg", num_classes=k),
            ModelInfo("deeplabv3plus", "seg", [2048], [8], task="seg", num_classes=k))


def _cls_batch(g: torch.Generator) -> tuple[ClsBatch, ModelInfo, ModelInfo]:
    n, k = 64, 1000
    labels = torch.randint(0, k, (n,), generator=g)
    labels[:8] = -1
    info = ModelInfo("resnet18", "cls", [], [], task="cls", num_classes=k)
    return ClsBatch(torch.randn(n, k, generator=g), torch.randn(n, k, generator=g), labels), info, info


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, list):
        return [_to(x, device) for x in obj]
    if hasattr(obj, "__dataclass_fields__"):
        return type(obj)(**{k: _to(getattr(obj, k), device) for k in obj.__dataclass_fields__})
    return obj


def _losses(distiller, batch, device, dtype=None):
    distiller = copy.deepcopy(distiller).to(device)
    batch = _to(batch, device)
    if hasattr(distiller, "before_epoch") and getattr(distiller, "prototypes", "none") is None:
        distiller.before_epoch(iter([batch]))          # GKP: prototypes from this batch
    if dtype is None:
        out = distiller(batch)
    else:
        with torch.autocast(device.split(":")[0], dtype=dtype):
            out = distiller(batch)
    return {k: float(v.detach().float()) for k, v in out.items()}


def main() -> int:
    # --self-test: the same comparison CPU against CPU (checks the script where no GPU is)
    target = "cpu" if "--self-test" in sys.argv else "cuda"
    if target == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the CUDA-against-CPU comparison was not run")
        return 2
    name = torch.cuda.get_device_name() if target == "cuda" else "CPU (self-test)"
    print(f"machine: {platform.node()}, {name}, torch {torch.__version__}, CUDA {torch.version.cuda}")
    builders = {"det": _det_batch, "seg": _seg_batch, "cls": _cls_batch}
    worst = 0.0
    failed = []
    for entry in catalog.METHODS:
        if entry.target is None:
            continue
        for task in entry["tasks"]:
            g = torch.Generator().manual_seed(0)
            batch, s_info, t_info = builders[task](g)
            params = catalog.method_params(entry.name, s_info.family,
                                           {"pgm_min_box": 0.0} if entry.name == "gkp" else None)
            torch.manual_seed(0)
            distiller = catalog.METHODS.load(entry.name)(params, s_info, t_info)
            distiller.epoch, distiller.max_epochs = 1, 2
            cpu = _losses(distiller, batch, "cpu")
            for label, dtype, tol in (("float32", None, 1e-4), ("bf16 autocast", torch.bfloat16, 5e-2)):
                try:
                    gpu = _losses(distiller, batch, target, dtype)
                except Exception as exc:                          # report, go on with the others
                    failed.append(f"{entry.name} ({task}, {label}): {type(exc).__name__}: {exc}")
                    print(f"  {entry.name:<12}{task:<5}{label:<15}FAILED {type(exc).__name__}: {exc}")
                    continue
                rel = max(abs(gpu[k] - cpu[k]) / max(abs(cpu[k]), 1e-8) for k in cpu)
                worst = max(worst, rel if dtype is None else 0.0)
                ok = rel <= tol and set(gpu) == set(cpu)
                if not ok:
                    failed.append(f"{entry.name} ({task}, {label}): relative difference {rel:.2e} > {tol:g}")
                print(f"  {entry.name:<12}{task:<5}{label:<15}max relative difference {rel:.2e} "
                      f"({'ok' if ok else 'OVER ' + format(tol, 'g')}): " +
                      ", ".join(f"{k}={cpu[k]:.4g}/{gpu[k]:.4g}" for k in cpu))
    print(f"worst float32 relative difference: {worst:.2e}; {len(failed)} problem(s)")
    for line in failed:
        print(f"  {line}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
