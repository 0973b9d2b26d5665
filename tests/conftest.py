"""Shared fixtures: tiny suites written to a temporary directory."""
from __future__ import annotations

import ipaddress
import os
import textwrap
from pathlib import Path

import pytest

from . import throwaway

REPO = Path(__file__).resolve().parent.parent

# a method for each task registered from inside tests/, before the test modules are
# collected: the registry-looping tests must pick it up as they would a newcomer's
throwaway.register()
THROWAWAY = {"det": "tmp_cwd", "seg": "tmp_cwd", "cls": "tmp_logit_mse"}

TINY_SUITE = """
name: tiny
pretrained: false
datasets:
  shapes:
    format: coco
    root: {root}
    synth: {{train_images: 8, val_images: 4, image_size: 64, max_objects: 3, seed: 1}}
teachers:
  t:
    arch: retinanet
    backbone: {{depth: 34, base_channels: 8}}
    neck: {{out_channels: 16}}
    head: {{feat_channels: 16, stacked_convs: 1}}
students:
  s:
    arch: retinanet
    backbone: {{depth: 18, base_channels: 8}}    # shallower than the teacher's, same widths: FGD inherits
    neck: {{out_channels: 16}}
    head: {{feat_channels: 16, stacked_convs: 1}}
pairs:
  - {{teacher: t, student: s}}
methods: [none, fgd]
seeds: [0]
schedule: {{epochs: 1, val_interval: 1, batch_size: 4, lr: 0.01, warmup_iters: 0, img_scale: [64, 64]}}
resources: {{cpu: 1, gpu: 0}}
output: {output}
"""


@pytest.fixture(autouse=True, scope="session")
def _allow_writes_under_tmp(tmp_path_factory):
    """Suites in the tests write under pytest's temporary directory: allow it, as a user
    allows a root with --output-root or $KD_HARNESS_OUTPUT_ROOT."""
    import os
    base = str(tmp_path_factory.getbasetemp())
    old = os.environ.get("KD_HARNESS_OUTPUT_ROOT")
    os.environ["KD_HARNESS_OUTPUT_ROOT"] = base
    yield
    if old is None:
        os.environ.pop("KD_HARNESS_OUTPUT_ROOT", None)
    else:
        os.environ["KD_HARNESS_OUTPUT_ROOT"] = old


@pytest.fixture(autouse=True)
def _loading_as_the_environment_had_it():
    """``run_trial`` and the CLI make every ``torch.load`` of their process weights-only
    (``harness.run.weights.harden_loading``, through the environment); in the test process
    that would leak into the next test's own loads: restored after each test."""
    keys = ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")
    before = {k: os.environ.get(k) for k in keys}
    yield
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture
def write_suite(tmp_path: Path):
    """write_suite(text=None, name='suite.yaml', **fmt) -> path; defaults to the tiny suite."""
    def _write(text: str | None = None, name: str = "suite.yaml", **fmt: str) -> Path:
        fmt.setdefault("root", str(tmp_path / "data" / "shapes"))
        fmt.setdefault("output", str(tmp_path / "results" / "tiny"))
        body = textwrap.dedent(text) if text is not None else TINY_SUITE.format(**fmt)
        path = tmp_path / name
        path.write_text(body)
        return path
    return _write


@pytest.fixture(scope="session")
def synth_coco(tmp_path_factory) -> Path:
    """A small synthetic COCO-layout dataset shared by the tests that train."""
    from harness.data.synth import write_coco
    return write_coco(tmp_path_factory.mktemp("data") / "shapes", train_images=8, val_images=4,
                      image_size=64, max_objects=3, seed=1)


def tiny_model(name: str, width: int, neck: int) -> dict:
    """A suite model entry for a very small RetinaNet."""
    return {"name": name, "arch": "retinanet", "pretrained": False,
            "backbone": {"depth": 18, "base_channels": width},
            "neck": {"out_channels": neck}, "head": {"feat_channels": neck, "stacked_convs": 1}}


def coco_dataset(root: Path, split: str = "train"):
    """mmdet's CocoDataset over a synthetic COCO-layout root, as the harness configures it."""
    from mmdet.datasets import CocoDataset
    from mmdet.utils import register_all_modules

    from harness.data.formats import CocoFormat
    register_all_modules()
    cfg = CocoFormat().dataset({"root": str(root), "classes": None}, split, [64, 64])
    cfg.pop("type")
    return CocoDataset(**cfg)


@pytest.fixture(scope="session")
def det_batch(synth_coco) -> dict:
    """Two training samples of the synthetic COCO data, as a dataloader batch."""
    ds = coco_dataset(synth_coco)
    samples = [ds[i] for i in range(2)]              # one pipeline run per sample: image and boxes agree
    return {"inputs": [s["inputs"] for s in samples], "data_samples": [s["data_samples"] for s in samples]}


def train_with_frozen_teacher(model, make_losses, steps: int = 2, lr: float = 0.01) -> dict:
    """A few SGD steps on ``make_losses()``; checks every step's total is finite, and
    afterwards that the teacher is bit-identical (buffers too) and got no gradient while
    the student did. Returns the last loss dict."""
    import copy

    import torch
    before = copy.deepcopy(model.teacher.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        losses = make_losses()
        total, log = model.parse_losses(losses)
        assert torch.isfinite(total), log
        opt.zero_grad()
        total.backward()
        opt.step()
    assert all(torch.equal(before[k], v) for k, v in model.teacher.state_dict().items())
    assert all(p.grad is None for p in model.teacher.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.student.parameters())
    return losses


def check_distiller_losses(out: dict, own: set) -> dict:
    """What every registered distiller must give, whatever its task: at least one term
    of its own besides the student's losses, each named ``loss_*`` and finite. Returns
    the distiller's terms."""
    import torch
    mine = {k: v for k, v in out.items() if k not in own}
    assert mine, "the distiller added no loss"
    bad = [k for k in mine if not k.startswith("loss_")]
    assert not bad, f"loss terms must be named loss_*: {bad}"
    for k, v in mine.items():
        assert all(torch.isfinite(x).all() for x in (v if isinstance(v, list) else [v])), f"{k} is not finite: {v}"
    return mine


def check_gradients_reach_student_and_distiller_only(model) -> None:
    """After a backward: every parameter with a gradient is the student's or the
    distiller's (its adapters), and the distiller's trainable parts, if any, got one."""
    trainable = {id(p) for p in model.student.parameters()} | {id(p) for p in model.distiller.parameters()}
    assert all(id(p) in trainable for p in model.parameters() if p.grad is not None)
    own = [p for p in model.distiller.parameters() if p.requires_grad]
    if own:
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in own), "no gradient reached the distiller"


def listening_ray_sockets() -> list[tuple[str, str]]:
    """(process name, local address) of every TCP socket a Ray process listens on, read
    from /proc (no extra package)."""
    inodes: dict[str, str] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if "ray" not in cmd or "pytest" in cmd:
                continue
            name = Path(cmd.split(" ")[0]).name
            for fd in os.listdir(f"/proc/{pid}/fd"):
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:["):
                    inodes[link[8:-1]] = name
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            parts = line.split()
            if parts[3] != "0A" or parts[9] not in inodes:       # 0A: LISTEN
                continue
            raw = bytes.fromhex(parts[1].split(":")[0])
            raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))    # per-word little endian
            addr = ipaddress.ip_address(raw)
            addr = getattr(addr, "ipv4_mapped", None) or addr                    # ::ffff:127.0.0.1
            ip = str(addr)
            found.append((inodes[parts[9]], ip))
    return found
