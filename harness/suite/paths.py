"""Where a suite's paths point: ``~`` and ``${VAR}`` expansion, the roots a run may write
under, ``extends:`` chains, ``pretrained:`` files and URIs, and the run's storage.

Every error names the file, line and key (:func:`_err`), before anything is imported or
trained.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .yamlio import Node, SuiteError, deep_merge, load_yaml

#: where a suite may write besides the working directory: os.pathsep-separated roots
OUTPUT_ROOT_ENV = "KD_HARNESS_OUTPUT_ROOT"

#: schemes mmengine's CheckpointLoader resolves (besides local paths): a ``pretrained:``
#: value with one of them is left to the loader, any other is a local file that must exist
URI_SCHEMES = ("torchvision://", "open-mmlab://", "openmmlab://", "mmcls://", "mmpretrain://", "pavi://",
               "http://", "https://", "s3://", "modelzoo://")


def is_uri(value: str) -> bool:
    return value.startswith(URI_SCHEMES)


def _err(node: Any, key: Any, message: str) -> SuiteError:
    where = node.where(key) if isinstance(node, Node) else "<suite>"
    return SuiteError(f"{where}: {message}")


_VAR = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def expand_path(value: str) -> str:
    """Expand ``~``, ``${VAR}`` and ``${VAR:-default}`` in a path from a suite. An unset
    (or empty) variable without a default is an error: it would silently become ''."""
    def repl(m: re.Match[str]) -> str:
        got = os.environ.get(m.group(1))
        if got:
            return got
        if m.group(2) is None:
            raise ValueError(f"environment variable {m.group(1)} is not set (write ${{{m.group(1)}:-default}} "
                             f"to give a default)")
        return m.group(2)
    return os.path.expanduser(_VAR.sub(repl, value))


def _expand(node: Any, key: str, value: str, what: str) -> str:
    try:
        return expand_path(value)
    except ValueError as exc:
        raise _err(node, key, f"{what}: {exc}") from None


def allowed_roots(extra: list[str] | tuple[str, ...] = ()) -> list[Path]:
    """Where a run may write: the working directory, ``$KD_HARNESS_OUTPUT_ROOT``
    (os.pathsep-separated) and ``--output-root``."""
    roots = [Path.cwd()] + [Path(p) for p in os.environ.get(OUTPUT_ROOT_ENV, "").split(os.pathsep) if p]
    roots += [Path(p) for p in extra]
    return [Path(os.path.abspath(os.path.expanduser(str(r)))).resolve() for r in roots]


def _contained(path: str, node: Any, key: str, what: str, roots: list[Path]) -> str:
    """``path`` made absolute, refused unless it resolves (symlinks followed) under a root,
    and so does every link directly inside it (``rows/`` linked elsewhere, say)."""
    why = outside(path, roots)
    if why:
        raise _err(node, key, f"{what}: {why}")
    return path


def outside(path: str | os.PathLike, roots: list[Path], links_inside: bool = True) -> str | None:
    """Why writing at ``path`` would leave the allowed ``roots`` (it, or with
    ``links_inside`` a symbolic link directly inside it, resolves elsewhere), or None."""
    def out(p: Path) -> bool:
        try:
            real = p.resolve()
        except (OSError, RuntimeError):          # a symlink loop
            return True
        return not any(real == r or r in real.parents for r in roots)
    hint = (f"the places this run may write are {', '.join(map(str, roots))}; write a path under one of them, or "
            f"allow its parent with --output-root DIR or ${OUTPUT_ROOT_ENV}")
    if out(Path(path)):
        return f"'{path}' is outside the places this run may write ({hint})"
    if links_inside and Path(path).is_dir():
        for child in Path(path).iterdir():
            if child.is_symlink() and out(child):
                return f"'{child}' is a link to a place outside the ones this run may write ({hint})"
    return None


#: suite files one suite may load through ``extends:`` (itself included): chains and
#: diamonds of bases that repeat would otherwise load and merge without end
MAX_SUITE_FILES = 32


def _load_with_extends(path: Path, seen: tuple[Path, ...] = (), loaded: list[Path] | None = None) -> Node:
    loaded = [] if loaded is None else loaded
    loaded.append(path)
    if len(loaded) > MAX_SUITE_FILES:
        raise SuiteError(f"{loaded[0]}: loads more than {MAX_SUITE_FILES} suite files through 'extends' "
                         f"(the last: {path}); a suite extends at most that many")
    doc = load_yaml(path)
    if doc is None:
        doc = Node()
        doc.file, doc.line, doc.key_lines = str(path), 1, {}
    if not isinstance(doc, dict):
        raise SuiteError(f"{path}: a suite must be a YAML mapping")
    bases = doc.get("extends") or []
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not all(isinstance(b, str) and b for b in bases):
        raise _err(doc, "extends", f"extends: a path or a list of paths of base suites, got {doc.get('extends')!r}")
    merged: Any = None
    for base in bases:
        try:
            base_path = (path.parent / _expand(doc, "extends", base, "extends")).resolve()
        except (OSError, RuntimeError) as exc:          # a symlink loop
            raise _err(doc, "extends", f"extends: base suite '{base}' cannot be read "
                                       f"({getattr(exc, 'strerror', None) or exc})") from None
        if base_path in seen:
            raise _err(doc, "extends", f"'{base}' extends itself (cycle)")
        if not base_path.exists():
            raise _err(doc, "extends", f"extends: base suite '{base}' not found (looked at {base_path})")
        base_doc = _load_with_extends(base_path, seen + (base_path,), loaded)
        merged = base_doc if merged is None else deep_merge(merged, base_doc)
    return doc if merged is None else deep_merge(merged, doc)


def _pretrained(node: Any, key: str, what: str, default: Any = True) -> Any:
    """A ``pretrained`` setting: True, False, a URI, or an existing local file (absolute)."""
    if not isinstance(node, dict) or key not in node:
        return default                       # the suite's setting, already checked
    value = node[key]
    if isinstance(value, bool):
        return value
    if is_uri(value):
        return _no_credentials(node, key, what, value)
    path = os.path.abspath(_expand(node, key, value, what))
    if not Path(path).is_file():
        raise _err(node, key, f"{what}: '{path}' is not a file; give a local checkpoint of the backbone, a URI "
                              f"(torchvision://, open-mmlab://, https://, ...), true for the config's own, "
                              f"or false to train from scratch")
    return path


def _no_credentials(node: Any, key: str, what: str, uri: str) -> str:
    """``uri``, refused (without repeating the secret) when it carries a credential: a suite's
    URIs are printed by plan and recorded in the results."""
    from harness.store import storage
    why = storage.credentials_in(uri)
    if why:
        raise _err(node, key, f"{what}: '{storage.redact(uri)}' carries {why}; URIs are printed and recorded in "
                              f"the results: give credentials through the environment (or a local copy of the file)")
    return uri


def _storage(doc: Any, roots: list[Path]) -> str | None:
    """The run's storage: a URI as given, or a local directory (plain or ``file://``),
    made absolute and confined like every other place a run writes."""
    from harness.store import storage
    value = doc.get("storage")
    if value is None:
        return None
    value = _expand(doc, "storage", str(value), "storage")
    why = storage.check_location(value)
    if why is not None:
        raise _err(doc, "storage", f"storage: '{storage.redact(value)}' cannot be the run's storage: {why}")
    local = storage.local_path(value)
    if local is None:
        return storage.join(value)          # no trailing '/', its query (pyarrow's options) kept
    _contained(local, doc, "storage", "storage", roots)
    return local


#: checkpoint URIs a teacher's ``checkpoint:`` may name: downloaded once into the cache
DOWNLOAD_SCHEMES = ("http://", "https://", "open-mmlab://", "openmmlab://", "torchvision://")
#: seconds a checkpoint download may wait for the server (connect, and each read)
DOWNLOAD_TIMEOUT_S = float(os.environ.get("KD_HARNESS_DOWNLOAD_TIMEOUT_S", "30"))


def _zoo_url(uri: str) -> str:
    """An ``open-mmlab://`` or ``torchvision://`` name as the http(s) URL mmengine's
    CheckpointLoader would fetch (its own tables); http(s) URLs as given."""
    if uri.startswith(("http://", "https://")):
        return uri
    from mmengine.runner import checkpoint as ckpt      # the loader's own name tables (imports torch)
    scheme, name = uri.split("://", 1)
    if scheme == "torchvision":
        table = ckpt.get_torchvision_models()
    else:
        table = ckpt.get_external_models()
        name = ckpt.get_deprecated_model_names().get(name, name)
    if name not in table:
        raise ValueError(f"'{uri}' is not a checkpoint mmengine knows (no '{name}' in its {scheme} table)")
    return table[name]


def cached_checkpoint(uri: str, cache: str | os.PathLike) -> tuple[str, str | None]:
    """Where a checkpoint URI's local copy lives in ``<cache>/downloads/``, and its sha256
    when that copy is there and agrees with its record (None otherwise). Reads only:
    what ``plan`` uses, which never downloads."""
    import hashlib

    url = _zoo_url(uri)
    name = Path(url.split("?", 1)[0]).name or "checkpoint.pth"
    local = Path(cache) / "downloads" / f"{hashlib.sha256(uri.encode()).hexdigest()[:16]}-{name}"
    record = local.with_name(local.name + ".sha256")
    if local.is_file() and record.is_file():
        from .spec import file_sha256
        want = record.read_text().split()[0]
        if file_sha256(local) == want:
            return str(local), want
    return str(local), None


def fetch_checkpoint(uri: str, cache: str | os.PathLike) -> tuple[str, str]:
    """The local copy of a checkpoint URI, downloaded once into ``<cache>/downloads/``
    (atomically; its sha256 recorded beside it) and reused while file and record agree.
    Returns (path, sha256). Raises ``ValueError`` saying why when it cannot be had."""
    path, digest = cached_checkpoint(uri, cache)
    if digest is not None:
        return path, digest
    url, local = _zoo_url(uri), Path(path)
    record = local.with_name(local.name + ".sha256")
    digest = download(url, local)
    record.write_text(f"{digest}  {url}\n")
    return str(local), digest


def download(url: str, local: Path) -> str:
    """Download ``url`` to ``local`` atomically (no half file is ever at ``local``), waiting
    at most :data:`DOWNLOAD_TIMEOUT_S` for the server at each step; returns the sha256.
    Raises ``ValueError`` saying why when it cannot."""
    import hashlib
    import urllib.error
    import urllib.request

    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.partial")
    h = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(tmp, "wb") as out:
            for block in iter(lambda: response.read(1 << 20), b""):
                h.update(block)
                out.write(block)
        os.replace(tmp, local)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ValueError(f"cannot download '{url}' ({type(exc).__name__}: {reason}; waited at most "
                         f"{DOWNLOAD_TIMEOUT_S:g} s for the server); download it where this machine can and give "
                         f"its local path") from None
    finally:
        tmp.unlink(missing_ok=True)
    return h.hexdigest()


def pretrained_file(uri: str) -> str:
    """The local file mmengine will load for a ``pretrained`` checkpoint: a path as it is;
    a URI (``torchvision://``, ``open-mmlab://``, ``http(s)://``) downloaded now, with a
    bounded wait, into torch hub's cache where mmengine's loader looks for it first (so a
    trial on this machine does not download it again)."""
    if not is_uri(uri):
        return uri
    if not uri.startswith(DOWNLOAD_SCHEMES):
        raise ValueError(f"'{uri}': the harness cannot check a checkpoint of this scheme before the run; give "
                         f"it as a local file or an http(s) / torchvision / open-mmlab URI")
    import torch.hub
    url = _zoo_url(uri)
    local = Path(torch.hub.get_dir()) / "checkpoints" / Path(url.split("?", 1)[0]).name
    if not local.is_file():
        download(url, local)
    return str(local)


#: written into a synthetic dataset's root: the format and every parameter it was written with
SYNTH_MARKER = ".kd-synth.json"


def synth_params(fmt: str, given: dict[str, Any]) -> dict[str, Any]:
    """A synthetic dataset's parameters with the writer's defaults filled in: what the
    data on disk is, whichever of them a suite spelt out."""
    import inspect

    from harness import catalog
    from harness.registry import import_target
    writer = import_target(catalog.DATASET_FORMATS.get(fmt)["synth"])
    defaults = {k: p.default for k, p in inspect.signature(writer).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {"writer": writer.__name__, **defaults, **given}


def synth_mismatch(ds: dict[str, Any]) -> str | None:
    """Why an existing root cannot be the synthetic dataset a suite describes (it was
    written with other parameters, or by no kd-harness writer), or None. Without this a
    suite asking for 64 validation images silently scores on the 32 an earlier suite
    wrote there."""
    import json
    root = Path(ds["root"])
    if ds.get("synth") is None or not root.exists():
        return None
    want = synth_params(ds["format"], ds["synth"])
    try:
        have = json.loads((root / SYNTH_MARKER).read_text())
    except (OSError, ValueError):
        return (f"'{root}' exists but holds no record of how it was written ({SYNTH_MARKER}), so it cannot be "
                f"told from the synthetic data the suite describes; delete it (it is written again) or remove "
                f"'synth:' to use it as it is")
    if have != want:
        diff = {k: (have.get(k), want.get(k)) for k in sorted(set(have) | set(want)) if have.get(k) != want.get(k)}
        return (f"'{root}' holds synthetic data written with other parameters "
                f"({', '.join(f'{k}: {a!r} there, {b!r} asked' for k, (a, b) in diff.items())}); delete it (it is "
                f"written again), or point root elsewhere")
    return None
