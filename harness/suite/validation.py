"""A suite's pydantic errors as messages that name the file, the line and the key, with
what would be valid (the models themselves are :mod:`.schema`'s)."""
from __future__ import annotations

import typing
from typing import Annotated, Any

from pydantic import BaseModel, ValidationError

from harness.registry import suggest
from .yamlio import Node, SuiteError


def _where(doc: Any, loc: tuple[Any, ...], fallback: str) -> str:
    """``file:line`` of the deepest key of ``loc`` found in the document."""
    where, node = fallback, doc
    for key in loc:
        if isinstance(node, Node) and key in node:
            where, node = node.where(key), node[key]
        elif isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
            node = node[key]
            if isinstance(node, Node):
                where = node.where()
        else:
            break
    return where


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The pydantic model that validates the mapping at ``loc`` (for listing its keys)."""
    current: Any = model
    for key in loc:
        if isinstance(current, type) and issubclass(current, BaseModel):
            if key not in current.model_fields:
                return None
            current = current.model_fields[key].annotation
            continue
        # through containers: dict[str, X] (key), list[X] (index), X | None
        while True:
            args = [a for a in typing.get_args(current) if a is not type(None)]
            origin = typing.get_origin(current)
            if origin in (dict, list):
                current = args[-1]
                break
            if args and origin is not Annotated:
                current = args[0]
                continue
            return None
    while not (isinstance(current, type) and issubclass(current, BaseModel)):
        args = [a for a in typing.get_args(current) if a is not type(None)]
        if not args or typing.get_origin(current) in (dict, list):
            return None
        current = args[0]
    return current


def _dotted(loc: tuple[Any, ...]) -> str:
    return ".".join(f"[{k}]" if isinstance(k, int) else str(k) for k in loc).replace(".[", "[")


def _message(err: dict[str, Any], model: type[BaseModel], prefix: tuple[Any, ...]) -> str:
    local = tuple(err["loc"])
    loc = prefix + local
    if err["type"] == "extra_forbidden":
        owner = _model_at(model, local[:-1])
        valid = list(owner.model_fields) if owner else []
        return (f"unknown key '{loc[-1]}' in {_dotted(loc[:-1]) or 'the suite'}{suggest(str(loc[-1]), valid)}; "
                f"valid keys: {', '.join(sorted(valid))}")
    if err["type"] == "missing":
        return f"{_dotted(loc)} is required"
    got = err.get("input")
    msg = err["msg"].removeprefix("Value error, ")
    if not loc:                         # a whole-document check; its message names the key
        return msg
    if isinstance(got, dict) or len(repr(got)) > 80:
        return f"{_dotted(loc)}: {msg}"
    return f"{_dotted(loc)}: {msg} (got {got!r})"


def validate(model: type[BaseModel], data: Any, doc: Any, file: str, prefix: tuple[Any, ...] = ()) -> Any:
    """Validate ``data`` (found at ``prefix`` in ``doc``) against ``model``; the first
    error becomes a :class:`SuiteError` naming the file, line and key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        loc = prefix + tuple(err["loc"])
        if not loc:                     # "key: message" from a whole-document check
            loc = (str(err["msg"]).removeprefix("Value error, ").split(":", 1)[0],)
        where = _where(doc, loc, file)
        raise SuiteError(f"{where}: {_message(err, model, prefix)}") from None
