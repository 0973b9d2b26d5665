"""Weight files: the exported ``{state_dict, meta}`` checkpoints trials write, loaded
back with ``torch.load(weights_only=True)`` and the few mmengine types allowed one by one,
and a hash of the weights themselves (for the rows' provenance)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def weights_hash(state: dict[str, Any]) -> str:
    """sha256 over a state dict's names and tensor bytes (order-independent of devices)."""
    import hashlib

    import torch
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update((t.float() if t.dtype == torch.bfloat16 else t).numpy().tobytes())   # numpy has no bfloat16
    return h.hexdigest()



def non_finite(state: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of a state dict holding a NaN or an infinity."""
    import torch
    return [name for name, t in state.items()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save_weights(state_dict: dict[str, Any], path: str | os.PathLike, meta: dict[str, Any]) -> Path:
    """Save ``{'state_dict', 'meta'}`` atomically (a reader never sees half a file)."""
    import torch
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save({"state_dict": state_dict, "meta": meta}, tmp)
        os.replace(tmp, path)
    finally:              # a full disk must not leave half a checkpoint behind
        tmp.unlink(missing_ok=True)
    return path


def _class_method(obj: Any, name: str) -> Any:
    """``getattr`` as a checkpoint may use it: mmengine's message hub pickles the
    statistics methods of its ``HistoryBuffer`` as ``getattr(HistoryBuffer, 'min')``.
    Only a public function of that class is given; anything else (a dunder, a module's
    attribute: the way a malicious pickle reaches code) is refused."""
    import pickle

    from mmengine.logging import HistoryBuffer
    if obj is HistoryBuffer and not name.startswith("_") and callable(getattr(HistoryBuffer, name, None)):
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(f"the checkpoint asks for getattr({obj!r}, {name!r}), which a weights file "
                                 f"never needs; refused")


def _checkpoint_globals() -> list[Any]:
    """The non-tensor types mmengine's training checkpoints pickle (its message hub's
    buffers and their statistics methods, numpy scalars, the schedulers' milestone
    counters): allowed one by one for ``torch.load(weights_only=True)``. Both the
    harness's own training states and what mmdet's / mmseg's ``tools/train.py`` write."""
    import collections

    import numpy as np
    from mmengine.logging import HistoryBuffer
    return [HistoryBuffer, np.ndarray, np.dtype, np.core.multiarray._reconstruct, np.core.multiarray.scalar,
            type(np.dtype(np.float64)), type(np.dtype(np.int64)), type(np.dtype(np.float32)),
            type(np.dtype(np.int32)), collections.Counter, (_class_method, "builtins.getattr")]


#: torch's switch that turns weights-only loading off where a call does not ask for it
#: (mmengine's loaders do not): ignored by the harness, which loads every file weights-only
_UNSAFE_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"


def harden_loading() -> str | None:
    """Make every ``torch.load`` of this process (and of the processes it starts: a local
    Ray's workers) weights-only, mmengine's and torch hub's included, whatever the
    environment says: ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is removed and
    ``TORCH_FORCE_WEIGHTS_ONLY_LOAD`` set. Returns a message when the first was set."""
    said = os.environ.pop(_UNSAFE_ENV, None)
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    if said is None:
        return None
    return (f"{_UNSAFE_ENV}={said} is set in the environment: ignored. kd-harness loads every checkpoint "
            f"weights-only (a pickle that runs code is refused); a checkpoint that needs more is not one to train on")


def read_state(path: str | os.PathLike) -> dict[str, Any]:
    """The state dict of a checkpoint file, read with ``torch.load(weights_only=True)``
    (mmengine's few training-state types allowed one by one): a mapping of names to
    tensors, or mmengine's ``{'state_dict': ..., 'meta': ...}``. Anything else, a file
    that is no checkpoint, or weights that are not finite raise ``ValueError`` in one
    line; PyTorch's own message is the exception's cause."""
    import torch
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        why = ("it asks to run code or build objects a weights file never needs (refused by weights-only loading)"
               if "Weights only load failed" in str(exc) else f"{type(exc).__name__}: {first[:200]}")
        raise ValueError(f"'{path}' cannot be read as a checkpoint: {why}") from exc
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else ckpt
    if not isinstance(state, dict) or not state \
            or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise ValueError(f"'{path}' holds {_describe(state)}, not a mapping of parameter names to tensors (or "
                         f"mmengine's {{'state_dict': ..., 'meta': ...}})")
    bad = non_finite(state)
    if bad:
        raise ValueError(f"'{path}' holds weights that are not finite (NaN or infinite) in {len(bad)} tensor(s), "
                         f"e.g. {bad[:3]}: a model with them scores nothing real")
    return state


def _describe(obj: Any) -> str:
    if isinstance(obj, dict):
        kinds = sorted({type(v).__name__ for v in obj.values()})
        return f"a mapping of {len(obj)} entries ({', '.join(kinds[:4]) or 'empty'})"
    return f"a {type(obj).__name__}"


def shape_mismatches(state: dict[str, Any], own: dict[str, Any]) -> list[str]:
    """``name: file (shape), model (shape)`` for each tensor both hold in another shape."""
    return [f"{k}: file {tuple(v.shape)}, model {tuple(own[k].shape)}" for k, v in state.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)]


def load_weights(model: Any, path: str | os.PathLike) -> None:
    """Load a checkpoint's weights strictly (:func:`read_state`: weights-only, a mapping of
    finite tensors); missing or unexpected keys and shapes that differ are errors."""
    try:
        state = read_state(path)
    except ValueError as exc:
        raise RuntimeError(str(exc)) from exc.__cause__
    shapes = shape_mismatches(state, model.state_dict())
    if shapes:
        raise RuntimeError(f"checkpoint '{path}' does not fit the model: {len(shapes)} tensor(s) of another shape, "
                           f"e.g. {shapes[0]}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint '{path}' does not fit the model: missing keys "
                           f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                           f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
