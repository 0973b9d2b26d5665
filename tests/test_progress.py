"""The run's progress view: live lines on a terminal, one plain line per event elsewhere."""
from __future__ import annotations

import io

from harness.progress import Progress


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
