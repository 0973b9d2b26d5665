"""A newcomer's distiller, end to end: the throw-away methods ``tests/throwaway.py``
registers from inside ``tests/`` (one per task) load in a suite, build in preflight and
train through ``run_trial`` and mmengine's ``Runner.train()`` (at least one iteration),
with their own loss terms in the step and an evaluation at the end. Nothing outside
``tests/`` knows them."""
from __future__ import annotations

import math
import re

import pytest
import torch

from harness import catalog
from harness.run.preflight import preflight
from harness.run.trial import run_trial
from harness.run.weights import save_weights
from harness.suite.load import load_suite

from . import throwaway
from .conftest import THROWAWAY, TINY_SUITE
from .test_cls import CLS_SUITE
from .test_seg import SEG_SUITE


def _suite_text(task: str, tmp_path) -> str:
    method = THROWAWAY[task]
    if task == "det":
        text = TINY_SUITE.format(root=tmp_path / "shapes", output=tmp_path / "results")
        return text.replace("methods: [none, fgd]", f"methods: [{method}]")
    if task == "seg":
        text = SEG_SUITE.format(root=tmp_path / "cs", output=tmp_path / "results")
        return text.replace("methods: [pixel_kd, icsd]", f"methods: [{method}]")
    text = CLS_SUITE.format(root=tmp_path / "shapes", output=tmp_path / "results")
    return re.sub(r"methods:\n(  .*\n)+", f"methods: [{method}]\n", text)


def _write_teacher(spec) -> None:
    """A teacher checkpoint where the student trial expects it (as a teacher trial would
    leave it), built by the task's own engine."""
    from harness.data.formats import ensure_dataset, num_classes
    ensure_dataset(spec.dataset)
    torch.manual_seed(3)
    net, _ = catalog.task_engine(spec.task, "build_model")(spec.teacher, num_classes(spec.dataset), spec.schedule)
    if hasattr(net, "init_weights"):
        net.init_weights()
    save_weights({k: v.clone() for k, v in net.state_dict().items()}, spec.teacher_checkpoint, {})


@pytest.mark.parametrize("task", ["det", "seg", "cls"])
def test_a_method_registered_from_the_tests_trains_through_the_runner(task, tmp_path, monkeypatch):
    method = THROWAWAY[task]
    path = tmp_path / "suite.yaml"
    path.write_text(_suite_text(task, tmp_path))
    suite = load_suite(path)
    spec = next(t for t in suite.trials if t.method == method)
    assert spec.task == task
    seen: list[dict] = []
    cls = catalog.METHODS.load(method)
    original = cls.forward

    def forward(self, batch):
        out = original(self, batch)
        seen.append({"task": self.task, "losses": {k: float(v) for k, v in out.items()}})
        return out
    monkeypatch.setattr(cls, "forward", forward)
    _write_teacher(spec)
    preflight(suite)                       # built once for its pair, as `harness run` does first
    result = run_trial(spec, log_level="WARNING")
    assert seen, "the Runner never called the distiller"
    assert {s["task"] for s in seen} == {task}
    mine = {k: v for k, v in seen[0]["losses"].items() if k.startswith("loss_tmp_")}
    assert mine and all(math.isfinite(v) for v in mine.values())
    primary = catalog.METRICS.get(catalog.task_metric(spec.dataset["format"]))["primary"]
    assert primary in result.metrics and result.epoch >= 1


def test_the_throwaway_methods_live_in_the_tests_only():
    assert catalog.METHODS.get("tmp_cwd").target.startswith("tests.")
    assert throwaway.ChannelKD.__module__ == "tests.throwaway"
