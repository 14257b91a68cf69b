"""Constructor arguments <-> their YAML form: the one hyperparameter scheme.

Checkpoints and file metadata must hold plain data (``torch.load(weights_only=True)`` refuses
arbitrary classes, and a JSON header can hold nothing else), so every constructor part
(adapter, objective, optimizer, pivotal tuning, family, caption source) is stored the way
jsonargparse YAML writes it, and :func:`from_config` rebuilds it from that form and the
argument's annotation:

- a dataclass (``AdapterConfig``, ``PivotalTuning``): its fields, ``{rank: 8, ...}``;
- an object: ``{class_path, init_args}``, its constructor arguments read back from the
  attributes of the same names (the convention that makes this generic);
- a callable that builds one (``optimizer``: a class, or LightningCLI's ``functools.partial``):
  ``{class_path, init_args}`` too, rebuilt as a ``functools.partial``.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import importlib
import inspect
import types
import typing
from typing import Any

__all__ = ["from_config", "import_class", "to_config"]

_PLAIN = (bool, int, float, str, type(None))


def to_config(obj: Any) -> Any:
    """The YAML form of ``obj``, which :func:`from_config` (or a YAML file) rebuilds."""
    if isinstance(obj, _PLAIN):
        return obj
    if isinstance(obj, list | tuple):
        return [to_config(o) for o in obj]
    if isinstance(obj, dict):
        return {k: to_config(v) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_config(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, type | functools.partial):
        return _callable_config(obj)
    if isinstance(obj, types.FunctionType | types.BuiltinFunctionType | types.MethodType):
        raise TypeError(
            f"cannot store {obj!r} as YAML: give a class (e.g. an optimizer class) or a "
            "functools.partial of one"
        )
    cls = type(obj)
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
    return {"class_path": _path(cls), "init_args": init_args}


def from_config(config: Any, hint: Any = None) -> Any:
    """Rebuild what :func:`to_config` described; objects given as such pass through.

    Args:
        config: the YAML form (nested ``class_path`` dicts included).
        hint: the argument's annotation. It tells a dataclass's fields from a plain dict, and
            a callable (``OptimizerCallable``: rebuilt as a ``functools.partial``) from an
            object.
    """
    if isinstance(config, list):
        return [from_config(c) for c in config]
    if not isinstance(config, dict):
        return config
    if "class_path" in config:
        cls = import_class(config["class_path"])
        hints = _init_hints(cls)
        args = {k: from_config(v, hints.get(k)) for k, v in config.get("init_args", {}).items()}
        return functools.partial(cls, **args) if _wants_callable(hint) else cls(**args)
    data_class = next((t for t in _members(hint) if dataclasses.is_dataclass(t)), None)
    if data_class is not None:
        hints = typing.get_type_hints(data_class)
        return data_class(**{k: from_config(v, hints.get(k)) for k, v in config.items()})
    return {k: from_config(v) for k, v in config.items()}


def import_class(class_path: str) -> type:
    """The class at a dotted import path, with an error that names the path when it fails."""
    module, _, name = class_path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"cannot import {class_path!r}: {err}") from err


def _path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _callable_config(factory: type | functools.partial) -> dict:
    """A class, or a partial of one (jsonargparse's holds the class among its positional
    arguments), as ``class_path`` and the keyword arguments."""
    if isinstance(factory, type):
        return {"class_path": _path(factory), "init_args": {}}
    classes = [a for a in (factory.func, *factory.args) if isinstance(a, type)]
    if not classes:
        raise TypeError(f"cannot tell which class {factory!r} builds")
    return {"class_path": _path(classes[-1]), "init_args": to_config(dict(factory.keywords))}


def _members(hint: Any) -> tuple:
    """The types a (possibly ``X | None``) annotation admits."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return typing.get_args(hint)
    return (hint,)


def _wants_callable(hint: Any) -> bool:
    return any(typing.get_origin(t) is collections.abc.Callable for t in _members(hint))


def _init_hints(cls: type) -> dict[str, Any]:
    """A constructor's annotations; none where they cannot be resolved (then no hint)."""
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation naming what its module does not import
        return {}
