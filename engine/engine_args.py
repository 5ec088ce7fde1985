"""EngineConfig as command-line flags, as vLLM's EngineArgs: one flag per field
(`--max-num-seqs`, `--enable-prefix-caching/--no-enable-prefix-caching`, ...), typed from
the field's annotation, its help the field's own comment in engine/config.py. A flag left
out keeps the field's default, so the command line can never disagree with the Python API.
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import types
import typing

from engine.config import EngineConfig

_FIELD = re.compile(r"(\w+):\s*[^=]+?=\s*.*?(?:\s+#\s*(.*))?$")


def field_help() -> dict[str, str]:
    """Each field's comment: the lines above it and the one after it, joined."""
    out: dict[str, str] = {}
    above: list[str] = []
    for line in inspect.getsource(EngineConfig).splitlines()[1:]:
        text = line.strip()
        if text.startswith("#"):
            above.append(text.lstrip("#").strip())
            continue
        m = _FIELD.fullmatch(text)
        if m and m.group(1) in EngineConfig.__dataclass_fields__:
            out[m.group(1)] = " ".join(above + ([m.group(2)] if m.group(2) else []))
        above = []
    return out


def _flag_type(hint) -> tuple[type, list | None]:
    """(the value's type, its choices) from an annotation: Optional and Literal unwrapped."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        words = [w for a in args if typing.get_origin(a) is typing.Literal for w in typing.get_args(a)]
        if words and set(args) - {a for a in args if typing.get_origin(a) is typing.Literal} == {int}:
            return _int_or(words), None  # e.g. max_programs_in_progress: int | Literal["auto"]
        assert len(args) == 1, f"one type per EngineConfig field, got {hint}"
        return _flag_type(args[0])
    if typing.get_origin(hint) is typing.Literal:
        return type(args[0]), list(args)
    assert hint in (bool, int, float, str), f"no flag type for {hint}"
    return hint, None


def _int_or(words: list[str]):
    """A flag value that is one of `words` or an int."""
    def parse(text: str):
        return text if text in words else int(text)
    parse.__name__ = f"int or {'/'.join(words)}"  # argparse names it in its error
    return parse


def add_engine_args(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ("model",)) -> None:
    """Adds every EngineConfig field but `skip` to `parser`, in an "engine" group."""
    hints = typing.get_type_hints(EngineConfig)
    docs = field_help()
    group = parser.add_argument_group("engine (EngineConfig; engine/config.py)")
    for f in dataclasses.fields(EngineConfig):
        if f.name in skip:
            continue
        kind, choices = _flag_type(hints[f.name])
        text = docs.get(f.name, "")
        if f.default is not None and "default" not in text:
            text += f" (default: {f.default})"
        text = text.strip().replace("%", "%%")  # argparse formats help with %
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
        else:
            group.add_argument(flag, type=kind, choices=choices, default=None, help=text)


def engine_options(args: argparse.Namespace, skip: tuple[str, ...] = ("model",)) -> dict:
    """The EngineConfig fields given on the command line (those add_engine_args added)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)
            if f.name not in skip and getattr(args, f.name, None) is not None}
