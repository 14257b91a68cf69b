"""The command line as people type it: plain list values, short usage errors, named positionals.

jsonargparse wants lists as JSON (``--loras '["a.safetensors"]'``) and prints the full usage
(90 lines for ``fit``) before the one line that matters. Here a list option may be repeated
with plain values (``--loras a.safetensors --loras b.safetensors``), a list positional takes a
plain value (``generate BASE "a prompt"``), and a usage error prints one usage line, the error,
and where the help is.
"""

from __future__ import annotations

import inspect
import json
import sys
import typing
from collections.abc import Callable

from lightning.pytorch.cli import LightningArgumentParser

__all__ = ["ShortUsageParser", "plain_lists", "run_tool"]


class ShortUsageParser(LightningArgumentParser):
    """A parser whose usage on errors is one line; ``--help`` is unchanged."""

    def print_usage(self, file=None) -> None:
        prog = self.prog.replace(" [options]", "")  # a subcommand's prog holds its parent's
        (file or sys.stdout).write(f"usage: {prog} [-h] [options]\n")


def _list_element(hint) -> type | None:
    """``list[X]`` (possibly ``| None``) -> X; anything else -> None."""
    if typing.get_origin(hint) in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        lists = [a for a in typing.get_args(hint) if typing.get_origin(a) in (list, tuple)]
        hint = lists[0] if lists else None
    if typing.get_origin(hint) in (list, tuple):
        args = typing.get_args(hint)
        return args[0] if args else str
    return None


def _value(text: str, element) -> object:
    if element is str:
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _is_json_list(text: str) -> bool:
    return text.lstrip().startswith("[")


def plain_lists(function: Callable, argv: list[str]) -> list[str]:
    """Rewrite plain list values in ``argv`` as the JSON lists jsonargparse parses.

    ``--name v`` repeated gathers into one list; a plain value given to a list positional
    becomes a one-element list, and plain values after the last positional join it (several
    prompts). JSON lists pass through unchanged.
    """
    hints = typing.get_type_hints(function)
    params = inspect.signature(function).parameters.values()
    positionals = [p.name for p in params if p.default is inspect.Parameter.empty]
    lists = {name: e for name, hint in hints.items() if (e := _list_element(hint)) is not None}
    options: list[str] = []
    gathered: dict[str, list] = {}
    given: list[list[str]] = []  # the positional values, each a list of plain strings
    i = 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith("-"):
            key, eq, value = arg.lstrip("-").partition("=")
            takes_value = not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--")
            if takes_value:
                value, i = argv[i + 1], i + 1
            if key in lists and (eq or takes_value) and not _is_json_list(value):
                gathered.setdefault(key, []).append(_value(value, lists[key]))
            else:
                options += [arg, value] if takes_value else [arg]
        elif len(given) >= len(positionals) and given and positionals[-1] in lists:
            given[-1].append(arg)  # more values for the last, list positional
        else:
            given.append([arg])
        i += 1
    out = []
    for name, values in zip(positionals, given, strict=False):
        if name in lists and not (len(values) == 1 and _is_json_list(values[0])):
            values = [json.dumps([_value(v, lists[name]) for v in values])]
        out += values
    out += [v for values in given[len(positionals) :] for v in values]
    for key, values in gathered.items():
        options += [f"--{key}", json.dumps(values)]
    return out + options


def run_tool(name: str, function: Callable, argv: list[str]) -> None:
    """Parse ``argv`` for ``function`` (its signature the schema, its docstring the help), run
    it and print what it returns, one item a line. A user error is one line, not a traceback."""
    from lightning_sd.lora_io import LoRAFileError

    parser = ShortUsageParser(prog=f"lightning-sd {name}", description=function.__doc__)
    added = parser.add_function_arguments(function, as_positional=True, fail_untyped=False)
    for action in parser._actions:
        if not action.option_strings and action.dest in added:
            action.metavar = action.dest.upper()  # not "[ITEM,...]" for every list
    config = parser.parse_args(plain_lists(function, argv))
    init = parser.instantiate_classes(config)
    try:
        result = function(**{key: init[key] for key in added})
    except (LoRAFileError, FileNotFoundError, ValueError) as err:
        sys.stderr.write(f"lightning-sd {name}: error: {err}\n")
        raise SystemExit(1) from None
    for line in result if isinstance(result, list) else [result]:
        print(line)
