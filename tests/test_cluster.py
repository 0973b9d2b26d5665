"""Orchestration on Ray: data-parallel trials on Ray Train workers, GPU packing (with
declared GPUs and no-op trials), a two-node cluster, resumption after the driver is
killed, and retries of a trial whose worker died."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from harness.store import results
from harness.cli import main

from .conftest import REPO, TINY_SUITE, listening_ray_sockets

GN = "{depth: 18, base_channels: 8, norm_cfg: {type: GN, num_groups: 4}}"


def _suite(tmp_path: Path, name: str = "suite.yaml", output: str = "out", **replace: str) -> Path:
    text = TINY_SUITE.format(root=tmp_path / "data" / "shapes", output=tmp_path / output)
    for old, new in replace.items():
        assert old in text, old
        text = text.replace(old, new)
    path = tmp_path / name
    path.write_text(text)
    return path


def _losses(output: Path, trial_id: str) -> list[float]:
    return json.loads((output / "trials" / trial_id / "progress.json").read_text())["losses"]


def test_two_workers_give_the_loss_curve_of_one_on_the_same_global_batch(tmp_path, capsys, monkeypatch):
    """Ray Train, two gloo workers with 2 images each (the student model's own
    ``resources``), against one process with 4: the
    same global batches (mmengine's sampler shards one permutation), the same loss at
    every step within tolerance (GroupNorm: no per-worker batch statistics; the detector
    normalises its loss per worker), and the exported student loads into a plain model.
    The two-worker trial's live progress ticks reach the driver's view as a single
    process's do."""
    common = {"{{depth: 18, base_channels: 8}}    # shallower than the teacher's, same widths: FGD inherits": GN,
              "methods: [none, fgd]": "methods: [none]",
              "epochs: 1, val_interval: 1": "epochs: 2, val_interval: 1"}
    common = {k.replace("{{", "{").replace("}}", "}"): v for k, v in common.items()}
    one = _suite(tmp_path, "one.yaml", "one", **common)
    two = _suite(tmp_path, "two.yaml", "two", **common)
    # the student model's own resources: two workers (the teacher keeps the suite's one)
    two.write_text(two.read_text().replace("batch_size: 4", "batch_size: 2")
                   .replace("students:\n  s:\n", "students:\n  s:\n    resources: {workers: 2}\n"))
    assert main(["run", str(one), "--num-cpus", "2"]) == 0
    import threading
    sockets: set[tuple[str, str]] = set()
    done = threading.Event()

    def watch() -> None:                         # every socket Ray's processes listen on meanwhile
        while not done.is_set():
            sockets.update(listening_ray_sockets())
            time.sleep(0.2)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    from harness.run.progress import Progress
    seen: list[tuple[str, dict]] = []
    shown = Progress.result
    monkeypatch.setattr(Progress, "result", lambda self, name, result: (seen.append((name, dict(result))),
                                                                        shown(self, name, result))[1])
    monkeypatch.setenv("KD_HARNESS_PROGRESS_S", "0")      # the workers (Ray starts them now) tick every step
    try:
        assert main(["run", str(two), "--num-cpus", "2"]) == 0
    finally:
        done.set()
        watcher.join()
    capsys.readouterr()
    # the workers' process group listens on loopback too, like the rest of a local Ray
    assert sockets and all(ip in ("127.0.0.1", "::1") for _, ip in sockets), sorted(sockets)
    rows = {}
    for out in ("one", "two"):
        df = results.read_results(tmp_path / out)
        rows[out] = df[(df["method"] == "none") & df["primary"]].iloc[0]
    assert rows["one"]["workers"] == 1 and rows["two"]["workers"] == 2
    ticks = [r for name, r in seen if "progress" in r and not name.endswith("/teacher")]
    assert [t["progress"] for t in ticks] == [1, 1, 2, 2], seen           # two iterations an epoch
    assert all(t["of"] == 2 and t["unit"] == "epoch" and t["images_per_s"] > 0 for t in ticks), ticks
    df = results.read_results(tmp_path / "two")
    assert set(df[df["role"] == "teacher"]["workers"]) == {1}
    a = _losses(tmp_path / "one", rows["one"]["trial_id"])
    b = _losses(tmp_path / "two", rows["two"]["trial_id"])
    assert len(a) == len(b) == 4                 # 8 images, a global batch of 4, two epochs
    assert a[0] == pytest.approx(b[0], rel=0.05), (a, b)
    assert a == pytest.approx(b, rel=0.15), (a, b)

    from harness.tasks.det.models import build_detector
    from harness.run.weights import load_weights
    path = tmp_path / "two" / "trials" / rows["two"]["trial_id"] / "student.pth"
    meta = torch.load(path, map_location="cpu", weights_only=False)["meta"]
    plain = build_detector(meta["model_cfg"])
    load_weights(plain, path)                    # strict: no DDP 'module.' prefixes, nothing missing


def _step_on_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One worker of a two-process gloo group: two training steps through the trial's
    hook; its clock says tick only on the first worker, its loss diverges only on the
    second (at the second step)."""
    import torch.distributed as dist

    from harness.run.hooks import Diverged, _trial_hook
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)

    class Runner:
        iter, epoch, max_epochs = 0, 0, 2
    ticks: list[dict] = []
    clock = {"tick": 0.0 if rank == 0 else float("inf")}
    hook = _trial_hook(None, [], clock, by_iter=False, metric=None, progress=ticks.append)
    batch = {"inputs": [0, 0]}
    hook.after_train_iter(Runner, 0, batch, {"loss": torch.tensor(1.0 + rank)})
    outcome: dict = {"ticks": ticks, "losses": clock["losses"]}
    try:
        hook.after_train_iter(Runner, 1, batch, {"loss": torch.tensor(float("inf") if rank else 1.0)})
    except Diverged as exc:
        outcome["diverged"] = str(exc)
    dist.destroy_process_group()
    Path(out_dir, f"{rank}.json").write_text(json.dumps(outcome))
    # torch 2.14's teardown at interpreter exit, after a gloo group has run a hook's
    # collectives, sometimes aborts ("terminate called without an active exception", in
    # about one spawn in ten on a 2-core machine, with the outcome already written): the
    # worker has nothing left to do, so it leaves without that teardown
    os._exit(0)


def test_the_workers_of_a_trial_tick_and_stop_together(tmp_path):
    """A data-parallel trial's workers decide together: all report a progress tick when
    any one's clock says so (the report is Ray Train's barrier: one worker reporting
    alone would hang), and all stop as diverged when any one's loss is not finite (one
    stopping alone would leave the others waiting in the next collective)."""
    import torch.multiprocessing as mp
    mp.spawn(_step_on_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    first, second = (json.loads((tmp_path / f"{r}.json").read_text()) for r in (0, 1))
    for worker in (first, second):
        assert [(t["progress"], t["of"], t["unit"]) for t in worker["ticks"]] == [(1, 2, "epoch")]
        assert worker["losses"] == [1.5]                      # the global batch's mean
    assert first["diverged"].startswith("a loss term became non-finite on another worker at iteration 1")
    assert second["diverged"].startswith("loss became inf at iteration 1")


def test_gpu_packing_with_declared_gpus_and_no_op_trials(tmp_path, capsys, monkeypatch):
    """Ray started with one declared (fake) GPU, trials asking for half a GPU: two run at
    once, never more, and each records the GPU id it was given. No-op trials (dry run)
    hold their resources for two seconds so that the packing shows."""
    import ray

    from harness.suite.load import load_suite
    from harness.run.matrix import run_suite
    from harness.run.session import _loopback_ray, _restore
    path = _suite(tmp_path, **{"resources: {cpu: 1, gpu: 0}": "resources: {cpu: 0.25, gpu: 0.5}",
                               "seeds: [0]": "seeds: [0, 1, 2]"})
    monkeypatch.setenv("KD_HARNESS_DRY_RUN_SECONDS", "2")
    suite = load_suite(path)
    _, previous = _loopback_ray(local=True)
    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False)
    try:
        summary = run_suite(suite, dry_run=True)
    finally:
        ray.shutdown()
        _restore(previous)
    assert len(summary["trials"]) == 7 and not any(t["error"] for t in summary["trials"])
    df = results.read_results(tmp_path / "out")
    assert set(df["status"]) == {"dry_run"} and df["value"].isna().all()
    assert set(df["accelerator_ids"]) == {'["0"]'} and (df["node"].str.len() > 0).all()
    spans = [(pd_ts(r.started_at), pd_ts(r.ended_at)) for r in df.itertuples()]
    most = max(sum(s <= t < e for s, e in spans) for t, _ in spans)
    assert most == 2, spans                      # two trials on one GPU at a time, never three
    assert main(["report", str(tmp_path / "out")]) == 0
    assert "no successful trials yet" in capsys.readouterr().out     # dry-run rows are never results


def pd_ts(text: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(text).timestamp()


def _wait_for(predicate, proc: subprocess.Popen, seconds: float = 240) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.5)
    raise AssertionError("timed out")


def test_sigkill_of_the_driver_then_run_again_resumes_without_loss_or_repetition(tmp_path):
    """The driver is killed with SIGKILL while a student trains (its teacher done); the
    same command again: finished trials are not rerun, the interrupted one resumes from
    its last checkpoint (past epoch 0), and the store has exactly one row set per trial."""
    path = _suite(tmp_path, **{"epochs: 1, val_interval: 1": "epochs: 1, val_interval: 1",
                               "methods: [none, fgd]": "methods: [none, fgd]"})
    path.write_text(path.read_text().replace(
        "students:\n  s:\n    arch: retinanet",
        "students:\n  s:\n    schedule: {epochs: 40, val_interval: 1}\n    arch: retinanet"))
    env = dict(os.environ, KD_HARNESS_OUTPUT_ROOT=str(tmp_path), PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "harness", "run", str(path), "--num-cpus", "1"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    out = tmp_path / "out"

    def a_student_has_a_checkpoint() -> bool:
        return any(p.parent.name != "finetune" and int(json.loads(p.read_text())["history"][-1]["epoch"]) >= 2
                   for p in (out / "trials").glob("*/progress.json")) if (out / "trials").exists() else False
    _wait_for(a_student_has_a_checkpoint, proc)
    time.sleep(1)
    os.kill(proc.pid, signal.SIGKILL)            # the driver only: no handler runs, nothing is written
    proc.communicate()
    time.sleep(3)                                # Ray's own processes notice their driver is gone
    os.killpg(proc.pid, signal.SIGKILL) if _group_alive(proc.pid) else None
    before = {f.stem for f in results.rows_dir(out).glob("*.parquet")}
    assert any(True for _ in before)             # the teacher's rows (at least) were written

    again = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert again.returncode == 0, again.stderr[-3000:]
    df = results.read_results(out)
    assert set(df["status"]) == {"ok"}
    assert df.groupby("trial_id")["metric"].apply(lambda m: m.is_unique).all()    # one row set per trial
    assert df["trial_id"].nunique() == 3
    skipped = f"{len(before)} skipped (already done)"
    assert skipped in again.stdout, again.stdout[-2000:]
    resumed = df[df["resumed_from"] > 0]
    assert len(resumed) and set(resumed["trial_id"]).isdisjoint(before), df[["trial_name", "resumed_from"]]
    curve = json.loads(resumed[resumed["primary"]].iloc[0]["curve"])
    assert [e for e, _ in curve] == list(range(1, 41))         # the evaluations before the crash kept


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False


def _free_port() -> int:
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _port_free(port: int) -> bool:
    import socket
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _cluster_pids(token: str, temp: str) -> set[int]:
    """Every live process of this test's cluster, and their children: those started with
    its own auth token in their environment or naming its temp dir on their command line
    (Ray renames some, e.g. ``ray::RuntimeEnvAgent``, a child of the raylet)."""
    parent, ours = {}, set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            if stat[0] == "Z":                    # a zombie holds no socket: only its parent's wait
                continue
            parent[int(proc.name)] = int(stat[1])
            if f"RAY_AUTH_TOKEN={token}".encode() in (proc / "environ").read_bytes() or \
                    temp.encode() in (proc / "cmdline").read_bytes():
                ours.add(int(proc.name))
        except (OSError, ValueError, IndexError):
            continue
    grown = True
    while grown:                                  # and their descendants
        more = {pid for pid, ppid in parent.items() if ppid in ours} - ours
        ours |= more
        grown = bool(more)
    return ours


def _kill_cluster(token: str, temp: str, within_s: float = 60.0) -> set[int]:
    """SIGKILL every process of this test's cluster, again and again until none is left
    (a raylet being killed may still be starting a worker or an agent, which one pass
    would miss and leave listening): returns the processes still alive at the deadline."""
    deadline = time.time() + within_s
    left = _cluster_pids(token, temp)
    while left and time.time() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass
        time.sleep(0.2)
        left = _cluster_pids(token, temp)
    return left


def test_a_two_node_cluster_runs_trials_on_both_nodes(tmp_path):
    """A real two-node Ray cluster on this machine: `ray start --head` on loopback and a
    second `ray start` joining it, each node with one CPU and its own custom resource. The
    suite runs with --address (in its own process, as a user would run it) and its rows
    show trials on both nodes; the test stops the cluster's processes itself."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    import secrets
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "TUNE_"))}
    # Ray's token authentication, with a token of this cluster's own for all its processes
    token = secrets.token_hex(32)
    env.update(KD_HARNESS_OUTPUT_ROOT=str(tmp_path), PYTHONPATH=str(REPO), RAY_AUTH_MODE="token",
               RAY_AUTH_TOKEN=token)
    import tempfile
    temp = Path(tempfile.mkdtemp(prefix="kdn", dir="/tmp"))     # short: Ray's socket paths must stay < 108 bytes
    address = f"127.0.0.1:{_free_port()}"
    path = _suite(tmp_path, **{"seeds: [0]": "seeds: [0, 1, 2]"})
    try:
        subprocess.run([ray_bin, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={address.split(':')[1]}",
                        "--num-cpus=1", '--resources={"head_node": 1}', "--include-dashboard=false",
                        f"--temp-dir={temp}"], env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                        '--resources={"second_node": 1}'], env=env, check=True, capture_output=True, timeout=120)
        run = subprocess.run([sys.executable, "-m", "harness", "run", str(path), "--address", address],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
    finally:
        left = _kill_cluster(token, str(temp))
        shutil.rmtree(temp, ignore_errors=True)
    assert not left, f"the cluster's processes outlived the test: {sorted(left)}"
    # and nothing listens on its head's port any more (only this cluster's: another Ray on
    # the machine, a user's or another run's, is none of this test's business)
    deadline = time.time() + 10                    # (sockets close as their processes are reaped)
    while time.time() < deadline and not _port_free(int(address.split(":")[1])):
        time.sleep(0.5)
    assert _port_free(int(address.split(":")[1])), f"something still listens on the cluster's head port {address}"
    df = results.read_results(tmp_path / "out")
    assert set(df["status"]) == {"ok"} and df["trial_id"].nunique() == 7
    assert df["node"].nunique() == 2, df[["trial_name", "node"]].drop_duplicates()


def test_a_trial_whose_worker_dies_is_retried_and_resumes(tmp_path, capsys):
    """max_failures: 1. The student's worker process is killed (SIGKILL) after its second
    evaluation; Tune restarts the trial, which resumes from its checkpoint; the run's
    summary counts the retry and the rows say two attempts."""
    import threading
    path = _suite(tmp_path, **{"methods: [none, fgd]": "methods: [none]"})
    path.write_text(path.read_text().replace(
        "students:\n  s:\n    arch: retinanet",
        "students:\n  s:\n    schedule: {epochs: 30, val_interval: 1}\n    arch: retinanet") + "max_failures: 1\n")
    out, killed = tmp_path / "out", []

    def kill_the_student_once() -> None:
        deadline = time.time() + 300
        while time.time() < deadline and not killed:
            for p in (out / "trials").glob("*/progress.json") if (out / "trials").exists() else []:
                try:
                    state = json.loads(p.read_text())
                except (OSError, ValueError):
                    continue
                if len(state["history"]) >= 2 and state["history"][-1]["epoch"] < 30 and \
                        (p.parent / "last_checkpoint").exists():
                    os.kill(state["pid"], signal.SIGKILL)
                    killed.append(p.parent.name)
                    return
            time.sleep(0.3)
    watcher = threading.Thread(target=kill_the_student_once, daemon=True)
    watcher.start()
    assert main(["run", str(path), "--num-cpus", "1"]) == 0
    watcher.join()
    printed = capsys.readouterr().out
    assert killed and "1 retried" in printed and "RETRY" in printed, printed[-2000:]
    df = results.read_results(out)
    row = df[(df["trial_id"] == killed[0]) & df["primary"]].iloc[0]
    assert row["status"] == "ok" and row["attempts"] == 2 and row["resumed_from"] >= 2
