"""Objects <-> plain ``{"class_path", "init_args"}`` dicts, the form jsonargparse YAML uses.

Checkpoints and file metadata must hold plain data (``torch.load(weights_only=True)`` refuses
arbitrary classes, and a JSON header can hold nothing else). The convention that makes this
generic: every constructor argument is stored on the object under the same name.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from typing import Any

__all__ = ["from_config", "import_class", "to_config"]

_PLAIN = (bool, int, float, str, type(None))


def to_config(obj: Any) -> Any:
    """A plain description of ``obj`` that ``from_config`` (or a YAML file) rebuilds."""
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, list | tuple):
        return [to_config(o) for o in obj]
    if isinstance(obj, dict):
        return {k: to_config(v) for k, v in obj.items()}
    cls = type(obj)
    if dataclasses.is_dataclass(obj):
        names = [f.name for f in dataclasses.fields(obj)]
    else:
        skip = getattr(cls, "config_exclude", ())
        params = inspect.signature(cls.__init__).parameters.values()
        names = [
            p.name
            for p in params
            if p.name != "self"
            and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            and p.name not in skip
        ]
    missing = [n for n in names if not hasattr(obj, n)]
    if missing:
        raise TypeError(f"{cls.__name__} does not store its constructor arguments {missing}")
    init_args = {n: to_config(getattr(obj, n)) for n in names}
    return {"class_path": f"{cls.__module__}.{cls.__qualname__}", "init_args": init_args}


def from_config(config: Any) -> Any:
    """Rebuild what ``to_config`` described (nested class_path dicts included)."""
    if isinstance(config, list):
        return [from_config(c) for c in config]
    if not isinstance(config, dict):
        return config
    if "class_path" not in config:
        return {k: from_config(v) for k, v in config.items()}
    cls = import_class(config["class_path"])
    return cls(**{k: from_config(v) for k, v in config.get("init_args", {}).items()})


def import_class(class_path: str) -> type:
    """The class at a dotted import path, with an error that names the path when it fails."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"cannot import {class_path!r}: {err}") from err
