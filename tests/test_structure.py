"""The codebase stays easy to change: each training knob declared once, short functions and files, no import
cycles (a lazy import inside a function counts too)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import typing
from pathlib import Path

from minimind_v.options import add_dataclass_args, flag_name
from minimind_v.train.config import TrainConfig
from minimind_v.train.settings import RunSettings, TrainOptions

SRC = Path(__file__).resolve().parents[1] / "src" / "minimind_v"
LIBRARY = sorted(SRC.rglob("*.py"))


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, TrainOptions)
    return parser


def _flag_fields(cls: type) -> set[str]:
    """The fields that become flags, those of inline groups in their group's place."""
    hints = typing.get_type_hints(cls)
    names: set[str] = set()
    for f in dataclasses.fields(cls):
        if f.metadata.get("cli") is not False:
            names |= _flag_fields(hints[f.name]) if f.metadata.get("inline") else {f.name}
    return names


def test_every_train_flag_is_one_field_of_the_config_or_the_run_settings():
    config = _flag_fields(TrainConfig)
    settings = {f.name for f in dataclasses.fields(RunSettings)}
    assert not config & settings
    parser = _train_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == config | settings
    # Every config field is reachable from the command line under its own name, and a shortcut flag
    # (--packing) writes the field it belongs to.
    flags = {opt for a in parser._actions for opt in a.option_strings}
    assert {flag_name(name) for name in config} <= flags
    ns = parser.parse_args(["--stage", "sft", "--data", "d", "--out", "o", "--packing"])
    assert ns.batching == "packed"


def test_a_flag_declared_twice_is_refused():
    @dataclasses.dataclass
    class Twice:
        config: TrainConfig = dataclasses.field(metadata={"inline": True})
        again: TrainConfig = dataclasses.field(metadata={"inline": True})

    try:
        add_dataclass_args(argparse.ArgumentParser(), Twice)
    except ValueError as err:
        assert "declared twice" in str(err)
    else:
        raise AssertionError("a second declaration of --stage went unnoticed")


def test_no_function_over_60_lines_and_no_file_over_400():
    long_functions, long_files = [], []
    for path in LIBRARY:
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > 400:
            long_files.append(str(path.relative_to(SRC)))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long_functions.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}")
    assert not long_files and not long_functions, (long_files, long_functions)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The minimind_v modules `path` imports anywhere in it (module level or inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name in modules}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return found


def test_no_import_cycle():
    modules = {_module_name(p): p for p in LIBRARY if "hf_template" not in p.parts}
    graph = {name: _imports(path, set(modules)) - {name} for name, path in modules.items()}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
