"""Teachers from OpenMMLab's world: the checkpoint mmdet's own ``tools/train.py`` writes
(``meta``, ``state_dict``, ``optimizer``, ``message_hub``, ...) is a suite's
``checkpoint:``, loaded weights-only and evaluated as given; a checkpoint URL is
downloaded once into the teacher cache with its sha256 recorded (served here by a
loopback HTTP server the test starts), reused without the server, and an unreachable
one is a suite error saying so, within the download timeout."""
from __future__ import annotations

import functools
import http.server
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from harness import catalog
from harness.run.preflight import preflight
from harness.run.trial import run_trial
from harness.suite.load import load_suite
from harness.suite.yamlio import SuiteError

from .conftest import TINY_SUITE
from .test_export import _tool


def _suite(tmp_path, checkpoint: str) -> Path:
    text = TINY_SUITE.format(root=tmp_path / "shapes", output=tmp_path / "results")
    text = text.replace("    head: {feat_channels: 16, stacked_convs: 1}\nstudents:",
                        f"    head: {{feat_channels: 16, stacked_convs: 1}}\n    checkpoint: {checkpoint}\nstudents:")
    path = tmp_path / "suite.yaml"
    path.write_text(text.replace("methods: [none, fgd]", "methods: [fgd]"))
    return path


def _train_with_mmdet_tools(tmp_path) -> Path:
    """One epoch of the tiny suite's teacher trained by mmdet's tools/train.py, from the
    complete config the harness exports for it; the checkpoint that tool writes."""
    from harness.data.formats import ensure_dataset
    from harness.run.export import export_config, write_config
    from harness.run.trial import _loop_cfgs, _optim_cfg
    from harness.run.weights import load_weights

    plain = tmp_path / "plain.yaml"
    plain.write_text(TINY_SUITE.format(root=tmp_path / "shapes", output=tmp_path / "plain-results"))
    spec = next(t for t in load_suite(plain).trials if t.role == "teacher")
    ensure_dataset(spec.dataset)
    parts = catalog.TASKS.load("det")(spec, load_weights)
    config = write_config(export_config(parts, "mmdet", 0, *_loop_cfgs(spec.schedule), _optim_cfg(spec.schedule)),
                          tmp_path / "teacher_config.py")
    work = tmp_path / "mmdet-work"
    done = subprocess.run([sys.executable, str(_tool("mmdet", "train.py")), str(config), "--work-dir", str(work)],
                          capture_output=True, text=True, timeout=600, env=dict(os.environ, CUDA_VISIBLE_DEVICES=""))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return work / "epoch_1.pth"


def test_a_teacher_trained_by_mmdets_own_train_tool_is_a_suites_checkpoint(tmp_path):
    ckpt = _train_with_mmdet_tools(tmp_path)
    raw = torch.load(ckpt, map_location="cpu", weights_only=False)         # what the tool wrote
    assert {"meta", "state_dict", "optimizer", "message_hub"} <= set(raw)
    suite = load_suite(_suite(tmp_path, str(ckpt)))
    preflight(suite)                      # loads it (weights-only) into the teacher and builds FGD on it
    teacher = next(t for t in suite.trials if t.role == "teacher")
    assert teacher.teacher_checkpoint == str(ckpt)
    result = run_trial(teacher, log_level="WARNING")          # evaluated as given, not trained
    assert "bbox_mAP" in result.metrics and not Path(teacher.trial_dir, "epoch_1.pth").exists()
    assert result.teacher_sha256 and result.epoch == 0


@pytest.fixture
def served(tmp_path):
    """A loopback HTTP server on tmp_path/www; yields (base URL, server)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", www, server
    server.shutdown()
    server.server_close()


def test_a_checkpoint_url_is_downloaded_once_and_recorded(tmp_path, served):
    from harness.run.weights import save_weights
    from harness.suite.spec import file_sha256
    from harness.tasks.det.task import build_model

    base, www, server = served
    from harness.data.formats import num_classes
    spec = next(t for t in load_suite(_plain(tmp_path)).trials if t.role == "teacher")
    net, _ = build_model(spec.model, num_classes(spec.dataset), spec.schedule)
    save_weights(net.state_dict(), www / "teacher.pth", {})
    suite = load_suite(_suite(tmp_path, f"{base}/teacher.pth"))
    teacher = next(t for t in suite.trials if t.role == "teacher")
    local = Path(teacher.teacher_checkpoint)
    assert local.is_file() and local.parent == Path(suite.doc["teacher_cache"]) / "downloads"
    assert file_sha256(local) == file_sha256(www / "teacher.pth")
    assert (local.parent / (local.name + ".sha256")).read_text().split()[0] == file_sha256(local)
    preflight(suite)
    server.shutdown()                                  # the second load needs no server
    again = next(t for t in load_suite(_suite(tmp_path, f"{base}/teacher.pth")).trials if t.role == "teacher")
    assert again.teacher_checkpoint == str(local) and again.trial_id == teacher.trial_id


def _plain(tmp_path) -> Path:
    path = tmp_path / "plain.yaml"
    path.write_text(TINY_SUITE.format(root=tmp_path / "shapes", output=tmp_path / "plain-results"))
    return path


def test_an_unreachable_checkpoint_url_is_a_suite_error_naming_it(tmp_path):
    import time
    started = time.monotonic()
    with pytest.raises(SuiteError, match=r"teachers\.t\.checkpoint: cannot download 'http://127\.0\.0\.1:1/t\.pth'"):
        load_suite(_suite(tmp_path, "http://127.0.0.1:1/t.pth"))
    assert time.monotonic() - started < 30


def test_getattr_in_a_checkpoint_reaches_nothing_but_the_message_hubs_methods(tmp_path):
    """What lets mmengine's checkpoints load (getattr(HistoryBuffer, 'min')) gives a
    malicious pickle nothing: any other getattr is refused."""
    import collections

    from mmengine.logging import HistoryBuffer

    from harness.run.weights import load_weights

    class Reach:
        def __init__(self, obj, name):
            self.obj, self.name = obj, name

        def __reduce__(self):
            return getattr, (self.obj, self.name)
    fine = tmp_path / "fine.pth"
    net = torch.nn.Linear(2, 1)
    torch.save({"state_dict": net.state_dict(), "hub": Reach(HistoryBuffer, "min")}, fine)
    load_weights(net, fine)
    for obj, name in ((HistoryBuffer, "__init__"), (collections.Counter, "fromkeys")):
        bad = tmp_path / "bad.pth"
        torch.save({"state_dict": net.state_dict(), "x": Reach(obj, name)}, bad)
        with pytest.raises(RuntimeError, match="refused"):
            load_weights(net, bad)


def test_plan_stays_offline_and_read_only_with_a_checkpoint_url(tmp_path, served, capsys):
    """``plan`` downloads nothing: a teacher checkpoint URL not yet in the cache is named
    as such (its trials' ids wait for its content), nothing is written to the cache, and
    no request reaches the server; once ``run``'s loading has fetched it, ``plan`` shows
    the same trial ids as the run."""
    from harness.cli import main
    from harness.run.weights import save_weights
    from harness.tasks.det.task import build_model
    from harness.data.formats import num_classes

    base, www, server = served
    requests: list[str] = []
    handle = server.RequestHandlerClass
    server.RequestHandlerClass = lambda *a, **k: (requests.append("GET"), handle(*a, **k))[1]
    spec = next(t for t in load_suite(_plain(tmp_path)).trials if t.role == "teacher")
    net, _ = build_model(spec.model, num_classes(spec.dataset), spec.schedule)
    save_weights(net.state_dict(), www / "teacher.pth", {})
    path = _suite(tmp_path, f"{base}/teacher.pth")
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"teacher t: checkpoint {base}/teacher.pth is not downloaded yet; run downloads it" in out
    assert not requests and not list(tmp_path.rglob("downloads"))
    unreachable = _suite(tmp_path, "http://127.0.0.1:1/t.pth")        # no server at all: plan still answers
    assert main(["plan", str(unreachable)]) == 0
    assert "http://127.0.0.1:1/t.pth is not downloaded yet" in capsys.readouterr().out
    suite = load_suite(_suite(tmp_path, f"{base}/teacher.pth"))       # as run loads it: fetched
    assert requests
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "not downloaded" not in out and all(t.trial_id in out for t in suite.trials)
