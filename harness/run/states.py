"""A trial's training states and logs: the evaluations so far (``progress.json``), the
newest complete state mmengine's CheckpointHook saved, their copies in the run's storage
(and fetching them back on another node), the trial's logs shipped beside them, and the
teacher weights a student loads (checked against the sha256 its teacher trial reported)."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from harness.store import results, storage
from harness.suite.spec import TrialSpec


def _write_progress(work_dir: Path, history: list[dict[str, Any]], stage: str, losses: list[float]) -> None:
    """The evaluations so far, next to the checkpoints: a resumed trial's curve starts
    with the evaluations made before the crash. Also the training loss of every step
    (of the global batch) since the trial (re)started, and the pid of the process."""
    import json
    results.write_text_atomic(work_dir / "progress.json", json.dumps(
        {"stage": stage, "pid": os.getpid(), "history": history, "losses": losses}))


def _read_progress(work_dir: Path) -> list[dict[str, Any]]:
    import json
    try:
        return list(json.loads((work_dir / "progress.json").read_text())["history"])
    except (OSError, ValueError, KeyError, TypeError):
        return []


def _complete(path: Path) -> bool:
    """Whether a state file was written to its end: torch.save writes a zip archive whose
    directory comes last, so one cut short by a crash is not a readable archive."""
    import zipfile
    try:
        with zipfile.ZipFile(path) as archive:
            return bool(archive.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


#: under this many free bytes a disk counts as full (a run is refused before it starts;
#: a failure there is told as one)
DISK_FULL_BELOW = 1 << 20


def existing_place(path: str | os.PathLike) -> Path:
    """``path``, or its nearest existing parent: where it is (or will be) on disk."""
    place = Path(path)
    while not place.exists() and place != place.parent:
        place = place.parent
    return place


def free_bytes(path: str | os.PathLike) -> int | None:
    """Free space of the disk ``path`` is (or will be) on, or None when unreadable."""
    import shutil
    try:
        return shutil.disk_usage(existing_place(path)).free
    except OSError:
        return None


def disk_full(path: str | os.PathLike) -> OSError | None:
    """A "No space left on device" error naming ``path`` when its filesystem has (almost)
    no room left: what a failure of Ray Tune's bookkeeping (its experiment state, a
    trial's pickled error: read back empty, ``EOFError``) means on a full disk."""
    import errno
    free = free_bytes(path)
    if free is None or free >= DISK_FULL_BELOW:
        return None
    return OSError(errno.ENOSPC, f"No space left on device ({free} bytes free)", str(path))


def last_checkpoint(work_dir: Path) -> Path | None:
    """The newest complete training state mmengine's CheckpointHook saved in ``work_dir``,
    or None. The hook names it in ``last_checkpoint`` after saving, but a crash while it
    saves the next one can leave that name on a removed file (the hook removes the state
    past ``max_keep_ckpts`` first), a half-written name file, or a half-written state: the
    newest complete ``epoch_*`` / ``iter_*`` file is then the one to resume from."""
    try:
        named = (work_dir / "last_checkpoint").read_text().strip()
    except OSError:
        named = ""
    if named and Path(named).is_file() and _complete(Path(named)):
        return Path(named)
    saved = [(int(f.stem.split("_")[1]), f) for f in _saved_states(work_dir) if f.stem.split("_")[1].isdigit()]
    return next((f for _, f in sorted(saved, reverse=True) if _complete(f)), None)


def _saved_states(work_dir: Path) -> list[Path]:
    """The training states mmengine's CheckpointHook saved in ``work_dir``."""
    return [*work_dir.glob("epoch_*.pth"), *work_dir.glob("iter_*.pth")]


def _remove_training_states(spec: TrialSpec) -> None:
    """A finished trial keeps its exported weights and logs, not its resumable states
    (in its directory, and their copies in the run's storage)."""
    for stage_dir in (spec.trial_dir, spec.trial_dir / "finetune"):
        for f in [*_saved_states(stage_dir), stage_dir / FETCHED_STATE]:
            f.unlink(missing_ok=True)
        (stage_dir / "last_checkpoint").unlink(missing_ok=True)
    if spec.storage:
        storage.delete(storage.trial_uri(spec.storage, spec.trial_id), tree=True)


def keep_logs(spec: TrialSpec, sent: dict[Path, tuple[int, int]] | None = None) -> None:
    """Copy the trial's logs to ``<storage>/logs/<trial id>/`` (mmengine's log and scalars,
    the config it ran, its evaluations, ``error.txt``), so that they outlive the node it
    ran on; weights and states are not logs. Called with every training state saved and
    when the trial ends; ``sent``: what an earlier call copied (file: size, mtime), not
    copied again. Every attempt's logs stay (mmengine names them by time); an earlier
    attempt's ``error.txt`` does not. A copy that fails is a warning, not a failed trial:
    its rows still say how it went. One worker of a data-parallel trial copies."""
    import sys
    if not spec.storage or not spec.trial_dir.is_dir():
        return
    from mmengine.dist import is_main_process
    if not is_main_process():
        return
    sent = {} if sent is None else sent
    where = storage.logs_uri(spec.storage, spec.trial_id)
    try:
        if not (spec.trial_dir / "error.txt").is_file():
            storage.delete(storage.join(where, "error.txt"))
        for f in sorted(spec.trial_dir.rglob("*")):
            if not f.is_file() or f.suffix in (".pth", ".partial") or f.name == "last_checkpoint":
                continue
            stat = f.stat()
            if sent.get(f) != (stat.st_size, stat.st_mtime_ns):
                storage.put(f, storage.join(where, f.relative_to(spec.trial_dir).as_posix()), checksum=False)
                sent[f] = (stat.st_size, stat.st_mtime_ns)
    except OSError as exc:
        print(f"warning: trial {spec.trial_id}: its logs did not all reach the storage {where}: {exc}",
              file=sys.stderr)


#: the name a training state fetched from the run's storage gets in the trial's directory
FETCHED_STATE = "fetched_state.pth"


def _state_sync_hook(spec: TrialSpec, stage_dir: Path, stage: str, by_iter: bool, interval: int) -> Any:
    """Copies each training state the CheckpointHook saves (every ``interval`` epochs or
    iterations, and the last), and the evaluations so far, to the run's storage (one
    worker does): a trial resumed on another node, or after its node's disk is gone,
    continues from there. The trial's logs go with each state."""
    from mmengine.dist import is_main_process
    from mmengine.hooks import Hook

    class StateSyncHook(Hook):
        priority = "LOWEST"          # after the CheckpointHook (VERY_LOW) saved, and the TrialHook

        def __init__(self) -> None:
            self.sent: Path | None = None
            self.logs_sent: dict[Path, tuple[int, int]] = {}

        def _send_state(self) -> None:
            found = last_checkpoint(stage_dir)
            if found is not None and found != self.sent and is_main_process():
                storage.put(found, storage.state_uri(spec.storage, spec.trial_id, stage))
                self.sent = found
                keep_logs(spec, self.logs_sent)      # a node that dies now leaves its logs so far

        def after_train_epoch(self, runner: Any) -> None:
            if not by_iter:
                self._send_state()

        def after_train_iter(self, runner: Any, batch_idx: int, data_batch: Any = None,
                             outputs: Any = None) -> None:
            if by_iter and (self.every_n_train_iters(runner, interval) or self.is_last_train_iter(runner)):
                self._send_state()

        def after_val_epoch(self, runner: Any, metrics: dict[str, float] | None = None) -> None:
            if (stage_dir / "progress.json").is_file() and is_main_process():
                storage.put(stage_dir / "progress.json",
                            storage.state_uri(spec.storage, spec.trial_id, stage, "progress.json"))

    return StateSyncHook()


def fetch_state(spec: TrialSpec, stage_dir: Path, stage: str) -> Path | None:
    """The trial's last training state from the run's storage (sha256-checked), with its
    evaluations so far, into ``stage_dir``; None when the storage holds none."""
    uri = storage.state_uri(spec.storage, spec.trial_id, stage)
    if storage.stored_sha256(uri) is None:
        return None
    progress_uri = storage.state_uri(spec.storage, spec.trial_id, stage, "progress.json")
    if storage.stored_sha256(progress_uri) is not None:
        storage.fetch(progress_uri, stage_dir / "progress.json")
    return storage.fetch(uri, stage_dir / FETCHED_STATE)


def teacher_file(spec: TrialSpec) -> str:
    """The local file of a student's teacher weights, checked against the sha256 its
    teacher trial reported: the node-local checkpoint when it is that file, else fetched
    from the run's storage (into the trial's output, checked on arrival)."""
    from harness.suite.spec import file_sha256
    ckpt, want = spec.teacher_checkpoint, spec.teacher_sha256
    if ckpt and Path(ckpt).is_file() and (not want or file_sha256(ckpt) == want):
        return ckpt
    teacher = f"the teacher trial for '{spec.teacher['name']}' on '{spec.dataset['name']}'"
    if spec.storage:
        local = Path(spec.output_dir) / "teachers" / f"{spec.teacher_id}.pth"
        if local.is_file() and (not want or file_sha256(local) == want):
            return str(local)
        uri = storage.teacher_uri(spec.storage, str(spec.teacher_id))
        try:
            return str(storage.fetch(uri, local, want))
        except storage.StorageError as exc:
            raise FileNotFoundError(f"teacher weights: {exc}; {teacher} failed, has not run, or its "
                                    f"storage was changed") from None
    if ckpt and Path(ckpt).is_file():
        raise RuntimeError(f"teacher checkpoint '{ckpt}' has sha256 {file_sha256(ckpt)[:16]}… but {teacher} "
                           f"wrote {want[:16]}…: the file was changed since; delete it and run the suite again "
                           f"(the teacher is retrained)")
    raise FileNotFoundError(f"teacher checkpoint '{ckpt}' is missing: {teacher} failed or has not run")


@contextlib.contextmanager
def teacher_lock(spec: TrialSpec) -> Iterator[None]:
    """Held while a harness-trained teacher's cache entry is trained or evaluated: two
    runs that need the same teacher (suites sharing a teacher cache, or a storage) train
    it once; the other waits here, then finds the weights and evaluates them. A lock file
    beside the node-local entry (``fcntl``: across the processes of a machine, and across
    nodes on a shared filesystem whose locks work, as NFS v4's do; it dies with its
    holder), and with a run's ``storage`` a lease beside the stored teacher
    (:func:`harness.store.storage.lease`: across nodes); weights another run stored while
    this one waited are fetched, so they are evaluated, not trained again."""
    import fcntl
    if spec.role != "teacher" or not spec.teacher_checkpoint or spec.teacher_id:
        yield                              # a given checkpoint (teacher_id: its sha256) is only evaluated
        return

    def waiting(_: Any = None) -> None:
        print(f"teacher {spec.name}: another run is training it; waiting for it (then its weights are used)",
              flush=True)
    lock = Path(spec.teacher_checkpoint).parent / ".teacher.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            if not spec.storage:
                yield
                return
            stored = storage.teacher_uri(spec.storage, spec.trial_id)
            with storage.lease(storage.join(spec.storage, "teachers", f"{spec.trial_id}.lock"), on_wait=waiting):
                if not Path(spec.teacher_checkpoint).is_file() and storage.stored_sha256(stored) is not None:
                    storage.fetch(stored, spec.teacher_checkpoint)       # another run's: evaluated, not retrained
                yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
