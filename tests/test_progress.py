"""The run's progress view: live lines on a terminal, one plain line per event elsewhere."""
from __future__ import annotations

import io

from harness.run.progress import Progress


def test_plain_output_is_one_line_per_event():
    out = io.StringIO()
    view = Progress(3, stream=out, live=False)
    view.started("d/t/teacher")
    view.result("d/t/teacher", {"progress": 2, "of": 12, "unit": "epoch", "images_per_s": 40.0})  # a tick: silent
    view.result("d/t/teacher", {"epoch": 1, "bbox_mAP": 0.25, "time_total_s": 3.0})
    view.retried("d/t/teacher")
    view.ended("d/t/teacher", failed=False)
    view.started("d/t->s/fgd/s0")
    view.ended("d/t->s/fgd/s0", failed=True)
    lines = out.getvalue().splitlines()
    assert lines == ["  start  d/t/teacher", "  d/t/teacher: epoch 1: bbox_mAP=0.250",
                     "  RETRY  d/t/teacher: its worker or node died; resuming from its last checkpoint",
                     "  done   d/t/teacher", "  start  d/t->s/fgd/s0",
                     "  FAILED d/t->s/fgd/s0 (error row written; see its error.txt)"]
    assert "\x1b[" not in out.getvalue()
    assert view.overall().startswith("done 2/3  running 0  pending 1  failed 1  retried 1")


def test_live_output_redraws_one_line_per_running_trial_and_an_overall_line():
    out = io.StringIO()
    view = Progress(4, stream=out, live=True)
    view.started("a")
    view.started("b")
    view.result("a", {"progress": 3, "of": 12, "unit": "epoch", "images_per_s": 40.0})
    view.result("b", {"epoch": 2, "bbox_mAP": 0.5})
    view.draw(force=True)
    block = out.getvalue().split("\x1b[2K")[-1].splitlines()     # the last drawn block: a, b, overall
    assert len(block) == 3
    assert "epoch 3/12" in block[0] and "40.0 img/s" in block[0] and "ETA" in block[0]
    assert "bbox_mAP=0.500" in block[1]
    assert block[2].startswith("done 0/4  running 2  pending 2")


def test_a_student_is_handed_out_when_its_own_teacher_ends_not_every_teacher(tmp_path):
    """No global barrier: the dependency-ordered searcher gives out every teacher first,
    a student alone at once, and a distilled student as soon as its own teacher's trial
    has ended, while another teacher is still running."""
    from ray.tune.search import Searcher

    from harness.suite.spec import TrialSpec
    from harness.run.matrix import _DependencyOrder

    def spec(role, name, teacher=None, method="fgd"):
        return TrialSpec(suite="s", task="det", role=role, dataset={"name": "d"}, model={"name": name, "arch": name},
                         method=method, method_name=method, teacher={"name": teacher} if teacher else None,
                         teacher_id=teacher, output_dir=str(tmp_path))
    t_det, t_cls = spec("teacher", "big-det", method="teacher"), spec("teacher", "big-cls", method="teacher")
    s_det = spec("student", "small-det", teacher=t_det.trial_id)
    s_cls = spec("student", "small-cls", teacher=t_cls.trial_id, method="ssld")
    alone = spec("student", "alone", method="none")
    order = _DependencyOrder([s_det, s_cls, alone, t_det, t_cls], dry_run=False, resume=True)

    def name(config):
        return config and config["trial"]["model"]["name"]
    assert [name(order.suggest(f"tune{i}")) for i in range(3)] == ["big-det", "big-cls", "alone"]
    assert order.suggest("tune3") is None               # both teachers still running
    order.on_trial_complete("tune1")                    # the classification teacher ends first
    assert name(order.suggest("tune3")) == "small-cls"  # its student starts; the detection teacher still runs
    assert order.suggest("tune4") is None
    order.on_trial_complete("tune0")
    assert name(order.suggest("tune4")) == "small-det"
    assert order.suggest("tune5") == Searcher.FINISHED


def test_a_ready_distilled_student_goes_before_a_student_alone(tmp_path):
    """Students alone need nothing: they fill the slots while teachers train, and a
    distilled student whose teacher has ended is handed out before them."""
    from harness.suite.spec import TrialSpec
    from harness.run.matrix import _DependencyOrder

    def spec(role, name, teacher=None, method="fgd"):
        return TrialSpec(suite="s", task="det", role=role, dataset={"name": "d"}, model={"name": name, "arch": name},
                         method=method, method_name=method, teacher={"name": teacher} if teacher else None,
                         teacher_id=teacher, output_dir=str(tmp_path))
    t_det = spec("teacher", "big-det", method="teacher")
    alone, alone2 = spec("student", "alone", method="none"), spec("student", "alone2", method="none")
    s_det = spec("student", "small-det", teacher=t_det.trial_id)
    earlier = spec("student", "small-cls", teacher="a-teacher-of-an-earlier-run", method="ssld")
    order = _DependencyOrder([alone, alone2, s_det, earlier, t_det], dry_run=False, resume=True)

    def name(config):
        return config and config["trial"]["model"]["name"]
    # the teacher, then the student whose teacher is done already, then a student alone
    assert [name(order.suggest(f"tune{i}")) for i in range(3)] == ["big-det", "small-cls", "alone"]
    order.on_trial_complete("tune0")
    assert [name(order.suggest(f"tune{i}")) for i in range(3, 5)] == ["small-det", "alone2"]
