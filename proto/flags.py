"""Command-line flags declared once, on the config dataclass fields they set.

A field declared with `flag(default, help, ...)` is a flag: its name is `--field-name` unless
given, its type follows the default (a bool default makes a `--x/--no-x` switch), and the
dataclass's own __post_init__ checks the value. `add_flags` adds a dataclass's flags to a
parser (nested config dataclasses included); `from_flags` builds the dataclass back from the
parsed namespace, so the checks run exactly once, in the dataclasses.

A leaf: standard library only.
"""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from dataclasses import MISSING, Field, dataclass, field, fields, is_dataclass
from typing import Any, TypeVar, get_type_hints

T = TypeVar("T")
_FLAG = "shardgate.flag"


@dataclass(frozen=True)
class Flag:
    """How one field appears on the command line."""

    help: str
    name: str | None = None
    """The option string; None = `--` and the field's name with dashes."""
    options: Mapping[str, Any] = field(default_factory=dict)
    """More argparse keywords (type, choices, action, metavar)."""


def flag(default: Any, help: str, *, name: str | None = None, **options: Any) -> Any:
    """A dataclass field that is also a command-line flag (see the module docstring)."""
    return field(default=default, metadata={_FLAG: Flag(help, name, options)})


def int_list(text: str) -> tuple[int, ...]:
    """A flag type: comma-separated integers ("" for none)."""
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _option(f: Field, spec: Flag) -> str:
    return spec.name or "--" + f.name.replace("_", "-")


def _dest(f: Field, spec: Flag) -> str:
    return _option(f, spec).lstrip("-").replace("-", "_")


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type) -> None:
    """Adds the flags of dataclass cls and of the config dataclasses it holds, in field order."""
    hints = get_type_hints(cls)
    for f in fields(cls):
        spec = f.metadata.get(_FLAG)
        if spec is None:
            if is_dataclass(hints[f.name]):
                add_flags(parser, hints[f.name])
            continue
        options = dict(spec.options)
        default = f.default
        if options.get("action") == "append":
            default = list(default)
        elif isinstance(default, bool):
            options.setdefault("action", argparse.BooleanOptionalAction)
        elif default is not None and default is not MISSING:
            options.setdefault("type", type(default))
        parser.add_argument(_option(f, spec), default=default, help=spec.help, **options)


def from_flags(cls: type[T], namespace: argparse.Namespace, given: Mapping[type, Any] | None = None) -> T:
    """Dataclass cls from parsed flags (see add_flags). Nested config dataclasses are built the
    same way, except those whose type is a key of `given`, which take its value (settings that
    come from elsewhere, such as the environment); fields that are no flag keep their default.
    Raises ValueError when a dataclass's check fails."""
    given = given or {}
    hints = get_type_hints(cls)
    values = {}
    for f in fields(cls):
        spec = f.metadata.get(_FLAG)
        if spec is not None:
            value = getattr(namespace, _dest(f, spec))
            values[f.name] = tuple(value) if isinstance(value, list) else value
        elif hints[f.name] in given:
            values[f.name] = given[hints[f.name]]
        elif is_dataclass(hints[f.name]):
            values[f.name] = from_flags(hints[f.name], namespace, given)
    return cls(**values)
