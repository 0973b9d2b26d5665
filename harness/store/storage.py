"""The run's storage: where teacher checkpoints and resumable training states live, so
that a trial on any node of a cluster finds them without a shared filesystem.

A suite's ``storage`` is a local directory or any URI pyarrow's filesystems accept
(``s3://bucket/prefix``, ``gs://…``, ``hdfs://…``, ``file:///…``); pyarrow does the
transfers. A URI may carry pyarrow's options as a query (an S3-compatible store such as
MinIO: ``s3://bucket/kd?endpoint_override=minio:9000&scheme=http``); every path under it
keeps that query. Credentials come from the environment (``AWS_ACCESS_KEY_ID``, …, or
``AWS_ENDPOINT_URL`` for the endpoint), never from the URI: it is printed and recorded.
Without ``storage`` the node-local paths are the storage (one machine, or a shared
filesystem).

Layout under the storage root::

    teachers/<teacher trial id>.pth            a teacher's weights (as the students load them)
    teachers/<teacher trial id>.pth.sha256     its sha256, written once the file is complete
    trials/<trial id>/<stage>/state.pth        the last resumable training state of a trial
    trials/<trial id>/<stage>/progress.json    its evaluations so far
    logs/<trial id>/…                          the trial's logs and error.txt, with each state and at its end

Every file fetched is checked against the sha256 recorded when it was stored (and, for
teacher weights, against the one the teacher trial reported in its rows) before use.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: URI schemes accepted for ``storage`` (pyarrow's filesystems; ``file`` is local)
SCHEMES = ("file", "s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")

#: query options that are secrets: refused in a storage URI (it is printed and recorded)
SECRET_OPTIONS = ("access_key", "secret_key", "session_token", "sas_token", "account_key", "password")

_CHUNK = 1 << 22


class StorageError(RuntimeError):
    """A stored file is missing, incomplete or not the one that was stored."""


def has_scheme(value: str) -> bool:
    """A URI (`scheme://…`), not a plain local path."""
    return "://" in value


def check_location(value: str) -> str | None:
    """Why ``value`` cannot be a storage location, or None if it can (no network used)."""
    if not has_scheme(value):
        return None
    scheme, _, rest = value.partition("://")
    scheme = scheme.lower()
    if scheme not in SCHEMES:
        return f"the scheme '{scheme}://' (valid: {', '.join(s + '://' for s in SCHEMES)}, or a local directory)"
    if not rest.partition("?")[0].strip("/"):
        return "a URI without a bucket or path"
    why = credentials_in(value)
    if why:
        return (f"it carries {why} (the location is printed and recorded in the results): give credentials "
                f"through the environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN, "
                f"GOOGLE_APPLICATION_CREDENTIALS, …) instead")
    return None


def credentials_in(uri: str) -> str | None:
    """What credential a URI carries (user-info before its host, or a secret among its
    query's options), in words that do not repeat it; None when it carries none."""
    from urllib.parse import parse_qsl, urlsplit
    if "://" not in uri:
        return None
    parts = urlsplit(uri)
    if "@" in parts.netloc:
        return "a user name or password before its host (user-info)"
    secrets = [k for k, _ in parse_qsl(parts.query, keep_blank_values=True)
               if k.lower() in SECRET_OPTIONS or any(w in k.lower() for w in ("secret", "password", "token", "key"))]
    return f"the credential '{secrets[0]}' in its query" if secrets else None


def redact(uri: str) -> str:
    """A URI safe to print: user-info and every query value replaced by '***'."""
    from urllib.parse import parse_qsl, urlsplit, urlunsplit
    if "://" not in uri:
        return uri
    parts = urlsplit(uri)
    netloc = ("***@" + parts.netloc.rsplit("@", 1)[1]) if "@" in parts.netloc else parts.netloc
    query = "&".join(f"{k}=***" for k, _ in parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def local_path(value: str) -> str | None:
    """The local directory a storage location names (a plain path or ``file://``), else None."""
    if not has_scheme(value):
        return os.path.abspath(value)
    if value.lower().startswith("file://"):
        return value[len("file://"):] or "/"
    return None


#: seconds the storage's server may take to accept a connection and to answer a request
#: (pyarrow's S3 client waits for minutes by default)
TIMEOUT_S = float(os.environ.get("KD_HARNESS_STORAGE_TIMEOUT_S", "20"))


def _fs(uri: str) -> tuple[Any, str]:
    """(pyarrow filesystem, path inside it) for a location; an S3 client waits at most
    :data:`TIMEOUT_S` to connect and for each answer."""
    from pyarrow import fs
    local = local_path(uri)
    if local is not None:
        return fs.LocalFileSystem(), local
    filesystem, path = fs.FileSystem.from_uri(uri)
    if isinstance(filesystem, fs.S3FileSystem):      # (its URI takes no timeouts: rebuilt with them)
        rebuild, (options,) = filesystem.__reduce__()
        filesystem = rebuild({**options, "connect_timeout": TIMEOUT_S, "request_timeout": TIMEOUT_S})
    return filesystem, path


def probe(uri: str) -> None:
    """Raise :class:`StorageError` (naming the location, never its credentials) unless
    the storage answers, within its timeouts: asked before Ray starts, so that a store
    that does not answer stops the run in seconds, not minutes in."""
    try:
        filesystem, path = _fs(uri)
        filesystem.get_file_info(path)
    except Exception as exc:             # pyarrow's OSError / ArrowInvalid, the SDK's messages
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise StorageError(f"storage '{redact(uri)}' does not answer ({first}; each request waits at most "
                           f"{TIMEOUT_S:g} s, KD_HARNESS_STORAGE_TIMEOUT_S): check the endpoint, the network and "
                           f"the credentials in the environment") from None


def join(root: str, *parts: str) -> str:
    """``root``/``parts``…, keeping the query of a URI root at the end of the result."""
    base, sep, query = root.partition("?")
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]]) + sep + query


def exists(uri: str) -> bool:
    from pyarrow import fs
    filesystem, path = _fs(uri)
    return filesystem.get_file_info(path).type == fs.FileType.File


def _make_parent(filesystem: Any, path: str) -> None:
    """Create the directory a stored file goes into (a no-op on object stores' prefixes)."""
    parent = path.rsplit("/", 1)[0]
    if parent:
        filesystem.create_dir(parent, recursive=True)


def put(local: str | os.PathLike, uri: str, checksum: bool = True) -> str:
    """Copy a local file to ``uri`` (a temporary name first, then moved into place, so a
    reader never sees half a file), then (``checksum``) its sha256 beside it, which
    :func:`fetch` checks; returns the sha256."""
    filesystem, path = _fs(uri)
    _make_parent(filesystem, path)
    digest = hashlib.sha256()
    tmp = f"{path}.{os.getpid()}.partial"
    with open(local, "rb") as src, filesystem.open_output_stream(tmp) as dst:
        for block in iter(lambda: src.read(_CHUNK), b""):
            digest.update(block)
            dst.write(block)
    filesystem.move(tmp, path)
    sha = digest.hexdigest()
    if checksum:
        with filesystem.open_output_stream(f"{path}.sha256") as dst:     # the file is complete: say so
            dst.write(sha.encode())
    return sha


def stored_sha256(uri: str) -> str | None:
    """The sha256 recorded beside a stored file, or None when it is not (completely) stored."""
    filesystem, path = _fs(uri)
    try:
        with filesystem.open_input_stream(f"{path}.sha256") as src:
            return src.read().decode().strip() or None
    except (FileNotFoundError, OSError):
        return None


def fetch(uri: str, local: str | os.PathLike, sha256: str | None = None) -> Path:
    """Copy a stored file to ``local`` and check its sha256 against the one recorded when
    it was stored and against ``sha256`` (when the caller knows which file it expects).
    Written under a temporary name and moved into place only once it checks out."""
    expected = stored_sha256(uri)
    if expected is None:
        raise StorageError(f"'{uri}' is not in the run's storage (or was never completely stored)")
    if sha256 and sha256 != expected:
        raise StorageError(f"'{uri}' holds a different file than expected: stored sha256 {expected[:16]}…, "
                           f"expected {sha256[:16]}… (was it overwritten by another run?)")
    filesystem, path = _fs(uri)
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.partial")
    digest = hashlib.sha256()
    try:
        with filesystem.open_input_stream(path) as src, open(tmp, "wb") as dst:
            while block := src.read(_CHUNK):
                digest.update(block)
                dst.write(block)
        if digest.hexdigest() != expected:
            raise StorageError(f"'{uri}' arrived with sha256 {digest.hexdigest()[:16]}… but was stored with "
                               f"{expected[:16]}…: the stored file is corrupt or was changed")
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return local


def delete(uri: str, tree: bool = False) -> None:
    """Remove a stored file, or (``tree``) a directory and everything under it; missing
    is fine."""
    filesystem, path = _fs(uri)
    try:
        (filesystem.delete_dir if tree else filesystem.delete_file)(path)
    except (FileNotFoundError, OSError):
        pass


# ----------------------------------------------------------------------------- leases
#: seconds a lease lasts without renewal (its holder renews it every third of that):
#: a holder that died frees it after this long
LEASE_TTL_S = float(os.environ.get("KD_HARNESS_LEASE_TTL_S", "300"))
#: seconds a taker waits after writing a lease before reading it back
LEASE_SETTLE_S = float(os.environ.get("KD_HARNESS_LEASE_SETTLE_S", "2"))


def _read_lease(uri: str) -> dict[str, Any] | None:
    filesystem, path = _fs(uri)
    try:
        with filesystem.open_input_stream(path) as src:
            held = json.loads(src.read().decode())
        return held if isinstance(held, dict) else None
    except (FileNotFoundError, OSError, ValueError):
        return None


def _write_lease(uri: str, holder: str, ttl: float) -> None:
    filesystem, path = _fs(uri)
    _make_parent(filesystem, path)
    with filesystem.open_output_stream(path) as dst:
        dst.write(json.dumps({"holder": holder, "expires": time.time() + ttl}).encode())


@contextlib.contextmanager
def lease(uri: str, ttl: float | None = None, settle: float | None = None, poll: float = 2.0,
          on_wait: Callable[[dict[str, Any] | None], None] | None = None) -> Iterator[None]:
    """Hold a lease on ``uri`` (any storage: an object store has no locks): read it; if
    nobody holds it (or the holder's lease expired), write our name, wait ``settle``
    seconds and read it back: the last writer wins and every other taker, reading a
    name not its own, waits (``on_wait`` is told once) and tries again. A lease is
    renewed while held and removed on release; one whose holder died expires after
    ``ttl``. Two takers who both read it free and both wrote within ``settle`` of each
    other still end with one holder; it needs the store's read-after-write consistency,
    which S3, GCS and local or shared filesystems give."""
    ttl = LEASE_TTL_S if ttl is None else ttl
    settle = LEASE_SETTLE_S if settle is None else settle
    me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:12]}"
    told = False
    while True:
        held = _read_lease(uri)
        if held is None or float(held.get("expires", 0)) < time.time():
            _write_lease(uri, me, ttl)
            time.sleep(settle)
            held = _read_lease(uri)
            if held is not None and held.get("holder") == me:
                break
        if on_wait is not None and not told:
            on_wait(held)
            told = True
        time.sleep(poll)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            try:
                _write_lease(uri, me, ttl)
            except Exception:        # a renewal that fails: the lease may expire; the work goes on
                pass
    keeper = threading.Thread(target=renew, name="kd-harness-lease", daemon=True)
    keeper.start()
    try:
        yield
    finally:
        stop.set()
        keeper.join(timeout=5)
        held = _read_lease(uri)
        if held is not None and held.get("holder") == me:
            delete(uri)


# ----------------------------------------------------------------- the run's layout
def teacher_uri(root: str, teacher_trial_id: str) -> str:
    return join(root, "teachers", f"{teacher_trial_id}.pth")


def ray_path(root: str | None, output: str) -> str:
    """Where Ray Tune and Ray Train keep their own state: under the run's storage when it
    has one, else under the run's output."""
    return join(root, "ray") if root else str((Path(output) / "ray").resolve())


def trial_uri(root: str, trial_id: str) -> str:
    return join(root, "trials", trial_id)


def logs_uri(root: str, trial_id: str) -> str:
    return join(root, "logs", trial_id)


def state_uri(root: str, trial_id: str, stage: str, name: str = "state.pth") -> str:
    return join(trial_uri(root, trial_id), stage, name)
