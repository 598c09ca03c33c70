"""Strict type checks for JSON and TOML input: values are checked, never coerced.

``"false"`` is not a boolean, 32.7 is not a group size, ``true`` is not an integer: each gets one
line naming where it was found, the key, the expected type and the value given.
"""
from __future__ import annotations

from .errors import CompressError

_NAMES = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string",
          dict: "an object", list: "a list", type(None): "null"}


def _matches(value, expected: type) -> bool:
    if expected is bool:
        return isinstance(value, bool)
    if expected is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if expected is float:  # JSON has one number type: an integer is a fine number
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, expected)


def expect(value, types: type | tuple[type, ...], where: str, key: str):
    """``value`` if it is one of ``types``, else CompressError "WHERE: KEY must be T, got V"."""
    types = types if isinstance(types, tuple) else (types,)
    if any(_matches(value, t) for t in types):
        return float(value) if types == (float,) else value
    wanted = " or ".join(_NAMES.get(t, t.__name__) for t in types)
    raise CompressError(f"{where}: {key} must be {wanted}, got {value!r}")


def expect_mapping(value, where: str) -> dict:
    """``value`` if it is a mapping (a JSON object), else one line naming ``where``."""
    if not isinstance(value, dict):
        raise CompressError(f"{where} must be an object (a mapping of keys to values), got {value!r}")
    return value


def expect_keys(d: dict, known: set[str] | frozenset[str], where: str) -> None:
    """Refuse keys of ``d`` outside ``known``, naming them and the known ones."""
    unknown = set(d) - set(known)
    if unknown:
        raise CompressError(f"{where}: unknown keys {sorted(unknown)} (known: {sorted(known)})")
