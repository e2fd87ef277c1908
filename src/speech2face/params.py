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


def dataclass_from_params(cls, section: str, p: dict, choices: dict[str, Iterable[str]] | None = None,
                          positive: Iterable[str] = ()):
    """A config dataclass from a params section: each key present must have the type of the
    field's default (an int is accepted for a float), numbers must be >= 0 (> 0 for the
    ``positive`` fields) and strings one of ``choices[key]``; unknown keys are refused."""
    from dataclasses import fields

    config = cls()
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(p) - names)
    check(not unknown, section, unknown[0] if unknown else "", p[unknown[0]] if unknown else None,
          f"a known key (one of {sorted(names)})")
    for name, value in p.items():
        kind = type(getattr(config, name))
        if kind is str:
            get_choice(p, section, name, (choices or {}).get(name, ()))
        else:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            check(ok and (kind is float or isinstance(value, int)), section, name, value,
                  "a number" if kind is float else "an integer")
            minimum = 0
            check(value > minimum if name in positive else value >= minimum, section, name, value,
                  f"a number {'>' if name in positive else '>='} 0")
            value = kind(value)
        setattr(config, name, value)
    return config
