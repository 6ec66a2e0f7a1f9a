"""Dataclasses -> command-line flags.

A knob is declared once, as a typed dataclass field with a one-line docstring under it; the
argparse flag, its type, its choices and its --help text are derived from that declaration.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import json
import textwrap
import types
import typing
from typing import Any, Literal, get_args, get_origin

from minimind_v.errors import UserError


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstrings written under each field of a dataclass (and of its bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def flag_name(field_name: str) -> str:
    return "--" + field_name.rstrip("_").replace("_", "-")


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, taken: set[str] | None = None) -> None:
    """Add one flag per field of `cls`; a field marked `inline` adds its own dataclass's flags instead.
    Fields without a default are required. A flag name claimed twice is a declaration error."""
    taken = set() if taken is None else taken
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.metadata.get("cli") is False:
            continue
        if f.metadata.get("inline"):
            add_dataclass_args(parser, hints[f.name], taken)
            continue
        if f.name in taken:
            raise ValueError(f"{cls.__name__}.{f.name}: the flag {flag_name(f.name)} is declared twice")
        taken.add(f.name)
        parser.add_argument(flag_name(f.name), *f.metadata.get("aliases", ()), **_flag_kwargs(cls, f, hints))
        for shortcut, (value, text) in f.metadata.get("shortcuts", {}).items():
            parser.add_argument(flag_name(shortcut), dest=f.name, action="store_const", const=value,
                                help=f"{text} (the same as {flag_name(f.name)} {value})")


def _flag_kwargs(cls: type, f: dataclasses.Field, hints: dict[str, Any]) -> dict[str, Any]:
    tp = _unwrap_optional(hints[f.name])
    # argparse formats help with %: a literal one ("2% of all steps") must be doubled
    kwargs: dict[str, Any] = {"dest": f.name, "help": field_docs(cls).get(f.name, "").replace("%", "%%")}
    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
        kwargs["required"] = True
    else:
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        kwargs["default"] = default
        if default not in (None, [], "") and not isinstance(default, bool):
            kwargs["help"] += f" (default: {default})"
    origin = get_origin(tp)
    if tp is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is list:
        (item,) = get_args(tp)
        kwargs["type"] = item
        if f.metadata.get("nargs"):
            kwargs["nargs"] = f.metadata["nargs"]
        else:
            kwargs["action"] = "append"
            kwargs["default"] = None
    elif origin is Literal:
        kwargs["choices"] = list(get_args(tp))
        kwargs["type"] = type(get_args(tp)[0])
    else:
        kwargs["type"] = tp
    if f.metadata.get("metavar"):
        kwargs["metavar"] = f.metadata["metavar"]
    return kwargs


def dataclass_from_args(cls: type, ns: argparse.Namespace) -> Any:
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("inline"):
            values[f.name] = dataclass_from_args(hints[f.name], ns)
            continue
        if not f.init or not hasattr(ns, f.name):
            continue
        value = getattr(ns, f.name)
        if value is None and f.default_factory is not dataclasses.MISSING:
            value = f.default_factory()
        values[f.name] = value
    return cls(**values)


def parse_value(text: str) -> Any:
    """`--set key=value` values: JSON when it parses (numbers, true/false, null, lists), else the string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(obj: Any, assignments: list[str], what: str = "--set") -> Any:
    """Apply `a.b.c=value` assignments to nested dataclasses; returns a new object."""
    for assignment in assignments:
        key, sep, raw = assignment.partition("=")
        if not sep:
            raise UserError(f"{what} {assignment!r}: expected key=value")
        obj = _set_path(obj, key.strip().split("."), parse_value(raw), key)
    return obj


def _set_path(obj: Any, path: list[str], value: Any, full_key: str) -> Any:
    name = path[0]
    if not dataclasses.is_dataclass(obj):
        raise UserError(f"--set {full_key}: {name!r} is not a group of settings")
    names = {f.name for f in dataclasses.fields(obj)}
    if name not in names:
        raise UserError(f"--set {full_key}: unknown setting {name!r} (known: {', '.join(sorted(names))})")
    current = getattr(obj, name)
    if len(path) > 1:
        return dataclasses.replace(obj, **{name: _set_path(current, path[1:], value, full_key)})
    hint = _unwrap_optional(typing.get_type_hints(type(obj))[name])
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if get_origin(hint) is Literal and value not in get_args(hint):
        raise UserError(f"--set {full_key}: {value!r} is not one of {list(get_args(hint))}")
    if hint in (int, float, str, bool) and not isinstance(value, hint):
        raise UserError(f"--set {full_key}: expected {hint.__name__}, got {value!r}")
    return dataclasses.replace(obj, **{name: value})
