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


def load_weights(model: Any, path: str | os.PathLike) -> None:
    """Load a checkpoint's weights strictly, with ``torch.load(weights_only=True)``.

    mmengine training checkpoints also pickle a few numpy and mmengine objects; those
    types are allowed explicitly rather than turning the safety check off.
    """
    import torch
    try:
        with torch.serialization.safe_globals(_checkpoint_globals()):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise RuntimeError(f"cannot load checkpoint '{path}': {exc}") from exc
    state = ckpt.get("state_dict", ckpt)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"checkpoint '{path}' does not fit the model: missing keys "
                           f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                           f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
