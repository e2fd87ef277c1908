"""Typed configs of the ``params.yaml`` sections, built and checked in one place.

Each stage's section is a frozen dataclass next to the code it configures (``ExtractConfig``
in speech2face.data.extract, ``EncoderConfig`` in speech2face.training.encoder, ...). Its
fields are declared with ``setting(default, ...)``: the type comes from the annotation and
the limits from the arguments, and the defaults are the values of params.yaml (a test checks
that). ``load_config(ExtractConfig)`` reads the section (``ExtractConfig.SECTION``), refuses unknown keys,
checks every value, runs the class's own ``check()`` for rules that tie several keys
together, and fails with one line (``ParamsError``) before any work starts.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from speech2face.core.errors import Speech2FaceError

PARAMS_FILE = Path("params.yaml")
C = TypeVar("C")


class ParamsError(Speech2FaceError, ValueError):
    """A value in params.yaml is missing, unknown or out of range."""


def bad_value(section: str, key: str, value: Any, expected: str) -> ParamsError:
    return ParamsError(f"params.yaml: {section}.{key} = {value!r}: expected {expected}")


def check(condition: bool, section: str, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise bad_value(section, key, value, expected)


def setting(default: Any, *, minimum: float | None = None, maximum: float | None = None,
            above: float | None = None, choices: Iterable[str] | None = None, expected: str | None = None):
    """A config field: its default and its limits (``above``: strictly greater than).

    ``expected`` replaces the generated description in the error message."""
    metadata = {"minimum": minimum, "maximum": maximum, "above": above,
                "choices": tuple(choices) if choices is not None else None, "expected": expected}
    if isinstance(default, list):
        raise TypeError("use a tuple default for a list setting (configs are frozen)")
    return dataclasses.field(default=default, metadata=metadata)


def read_params(path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found (run stages from the project root)")
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if not isinstance(params, dict):
        raise ParamsError(f"{path}: expected sections of key: value settings")
    return params


def load_section(section: str, path: str | Path = PARAMS_FILE) -> dict[str, Any]:
    params = read_params(path)
    if section not in params or not isinstance(params[section], dict):
        raise ParamsError(f"{path}: section '{section}' missing")
    return params[section]


def load_config(cls: type[C], path: str | Path = PARAMS_FILE) -> C:
    """The section ``cls.SECTION`` of params.yaml as a checked ``cls``."""
    return build_config(cls, load_section(cls.SECTION, path))


def build_config(cls: type[C], values: dict[str, Any]) -> C:
    """``cls`` from its section's key: value pairs (absent keys take their default)."""
    section = cls.SECTION
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise bad_value(section, unknown[0], values[unknown[0]], f"a known key (one of {sorted(known)})")
    hints = typing.get_type_hints(cls)
    checked = {name: _checked(section, name, value, hints[name], known[name].metadata)
               for name, value in values.items()}
    config = cls(**checked)
    if hasattr(config, "check"):
        config.check()
    return config


def as_params(config) -> dict[str, Any]:
    """The config as params.yaml would hold it (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


def _checked(section: str, key: str, value: Any, kind: Any, meta: dict) -> Any:
    written = value   # the message quotes what params.yaml says, not the converted value

    def fail(expected: str):
        raise bad_value(section, key, written, meta.get("expected") or expected)

    options = typing.get_args(kind) if typing.get_origin(kind) in (typing.Union, types.UnionType) else (kind,)
    nullable = type(None) in options
    kind = next(option for option in options if option is not type(None))
    if value is None:
        if nullable:
            return None
        fail(_description(kind, meta))
    if typing.get_origin(kind) is tuple:
        if not (isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)):
            fail("a list of numbers")
        return tuple(float(v) for v in value)
    if kind is bool:
        if not isinstance(value, bool):
            fail("true or false")
        return value
    if kind is str:
        choices = meta.get("choices")
        if choices is not None and value not in choices:
            fail(f"one of {list(choices)}")
        if not (isinstance(value, str) and value):
            fail("a non-empty string")
        return value
    if kind is int and not (isinstance(value, int) and not isinstance(value, bool)):
        fail(_description(kind, meta))
    if kind is float and not _is_number(value):
        fail(_description(kind, meta))
    value = kind(value)
    if meta.get("minimum") is not None and value < meta["minimum"]:
        fail(_description(kind, meta))
    if meta.get("maximum") is not None and value > meta["maximum"]:
        fail(_description(kind, meta))
    if meta.get("above") is not None and not value > meta["above"]:
        fail(_description(kind, meta))
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _description(kind: Any, meta: dict) -> str:
    noun = "an integer" if kind is int else "a number"
    limits = [f"{op} {meta[name]}" for name, op in (("minimum", ">="), ("above", ">"), ("maximum", "<="))
              if meta.get(name) is not None]
    return f"{noun} {' and '.join(limits)}" if limits else noun
