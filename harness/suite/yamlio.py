"""Strict YAML loading that remembers where each key was written.

Mappings load as :class:`Node` (a dict) carrying the file and the line of each key, so
that a validation error can say ``suites/x.yaml:12: unknown key 'methdos'``. Duplicate
keys are errors (plain PyYAML silently keeps the last one).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


#: a suite is a short file; anything larger is a mistake (or an attempt to exhaust memory)
MAX_BYTES = 1 << 20
#: nodes a suite may hold once its aliases are expanded (``*anchor`` copies what it names:
#: a few hundred bytes of nested aliases would otherwise expand to billions of nodes)
MAX_NODES = 200_000


class Node(dict):
    """A mapping from a YAML file; ``where(key)`` gives ``file:line`` of that key."""

    file: str = "<memory>"
    line: int = 0
    key_lines: dict[Any, int]

    def where(self, key: Any = None) -> str:
        line = self.key_lines.get(key, self.line) if key is not None and hasattr(self, "key_lines") else self.line
        return f"{self.file}:{line}" if line else self.file


class SuiteError(ValueError):
    """A suite is invalid; the message names the file, the line, the key and what is valid."""


def _loader_for(path: str) -> type:
    class Loader(yaml.SafeLoader):
        pass

    def construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> Node:
        loader.flatten_mapping(node)
        out = Node()
        out.file, out.line, out.key_lines = path, node.start_mark.line + 1, {}
        for key_node, value_node in node.value:
            key = loader.construct_object(key_node, deep=True)
            if not isinstance(key, (str, int, float, bool)) and key is not None:
                raise SuiteError(f"{path}:{key_node.start_mark.line + 1}: a key must be a name, got "
                                 f"{type(key).__name__} {key!r}")
            if key in out:
                raise SuiteError(f"{path}:{key_node.start_mark.line + 1}: key '{key}' is given twice")
            out[key] = loader.construct_object(value_node, deep=True)
            out.key_lines[key] = key_node.start_mark.line + 1
        return out

    Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct_mapping)
    return Loader


def load_yaml(path: str | Path) -> Any:
    """Load one YAML file strictly; errors name the file and line."""
    path = str(path)
    try:
        if Path(path).is_dir():
            raise SuiteError(f"{path}: is a directory, not a suite file")
        if Path(path).stat().st_size > MAX_BYTES:
            raise SuiteError(f"{path}: {Path(path).stat().st_size} bytes; a suite is at most {MAX_BYTES} bytes")
        if not Path(path).is_file():        # a FIFO, a device: reading it could block forever
            raise SuiteError(f"{path}: not a regular file; a suite is a YAML file")
        with open(path, encoding="utf-8") as f:
            loader = _loader_for(path)(f)   # (SafeLoader subclass)
            try:
                node = loader.get_single_node()
                if node is None:
                    return None
                size = expanded_size(node)
                if size > MAX_NODES:
                    raise SuiteError(f"{path}: expands to {size if size < 10 * MAX_NODES else 'over ' + str(10 * MAX_NODES)}"
                                     f" YAML nodes once its aliases (*name) are resolved; a suite holds at "
                                     f"most {MAX_NODES}")
                return loader.construct_document(node)
            finally:
                loader.dispose()
    except FileNotFoundError:
        raise SuiteError(f"{path}: no such file") from None
    except PermissionError:
        raise SuiteError(f"{path}: cannot be read (permission denied)") from None
    except UnicodeDecodeError as exc:
        raise SuiteError(f"{path}: not a text file (byte {exc.start} is not UTF-8); a suite is YAML text") from None
    except yaml.YAMLError as exc:
        raise SuiteError(f"{path}: not valid YAML: {exc}") from None
    except RecursionError:
        raise SuiteError(f"{path}: nested too deeply to be a suite") from None
    except OSError as exc:            # a symlink loop, a name too long, ...
        raise SuiteError(f"{path}: cannot be read ({exc.strerror or exc})") from None


def expanded_size(root: yaml.Node, limit: int = 10 * MAX_NODES) -> int:
    """How many nodes a composed YAML document holds with every alias expanded (an alias
    is the same node object again), counted in time linear in the distinct nodes and
    capped at ``limit``."""
    sizes: dict[int, int] = {}

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        sizes[id(node)] = limit            # (a node reached again while being counted: a cycle)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        for child in children:
            total = min(limit, total + size(child))
        sizes[id(node)] = total
        return total
    return size(root)


def deep_merge(base: Any, over: Any) -> Any:
    """Merge ``over`` into ``base``: mappings merge key by key, anything else replaces.
    The result keeps the line information of whichever side a key came from."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = Node(base)
        out.file = getattr(over, "file", getattr(base, "file", "<memory>"))
        out.line = getattr(over, "line", 0)
        out.key_lines = dict(getattr(base, "key_lines", {}))
        for key, value in over.items():
            out[key] = deep_merge(base[key], value) if key in base else value
            out.key_lines[key] = getattr(over, "key_lines", {}).get(key, 0)
        return out
    return over
