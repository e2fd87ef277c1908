"""Reading and checking a stage's section of ``params.yaml``.

Bad values stop a stage with one clear line (``ParamsError``), before any work starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import yaml


class ParamsError(ValueError):
    """A value in params.yaml is missing or out of range."""


def load_section(section: str, path: str | Path = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path} not found (run stages from the project root)")
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    if section not in params or not isinstance(params[section], dict):
        raise ParamsError(f"{path}: section '{section}' missing")
    return params[section]


def check(condition: bool, section: str, key: str, value: Any, expected: str) -> None:
    if not condition:
        raise ParamsError(f"params.yaml: {section}.{key} = {value!r}: expected {expected}")


def get_int(p: dict, section: str, key: str, minimum: int | None = None, allow_none: bool = False) -> int | None:
    value = p.get(key)
    if value is None and allow_none:
        return None
    check(isinstance(value, int) and not isinstance(value, bool), section, key, value, "an integer")
    if minimum is not None:
        check(value >= minimum, section, key, value, f"an integer >= {minimum}")
    return value


def get_float(p: dict, section: str, key: str, minimum: float | None = None, maximum: float | None = None) -> float:
    value = p.get(key)
    check(isinstance(value, (int, float)) and not isinstance(value, bool), section, key, value, "a number")
    value = float(value)
    if minimum is not None:
        check(value >= minimum, section, key, value, f"a number >= {minimum}")
    if maximum is not None:
        check(value <= maximum, section, key, value, f"a number <= {maximum}")
    return value


def get_choice(p: dict, section: str, key: str, choices: Iterable[str]) -> str:
    choices = list(choices)
    value = p.get(key)
    check(value in choices, section, key, value, f"one of {choices}")
    return value


def get_bool(p: dict, section: str, key: str) -> bool:
    value = p.get(key)
    check(isinstance(value, bool), section, key, value, "true or false")
    return value


def get_str(p: dict, section: str, key: str) -> str:
    value = p.get(key)
    check(isinstance(value, str) and value != "", section, key, value, "a non-empty string")
    return value
