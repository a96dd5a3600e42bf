"""The configuration machinery every stage's typed config uses: dataclasses from YAML, validated once.

Ranges are ``(min, max)`` pairs written as two-element YAML lists. Unknown keys, wrong types and
impossible ranges raise :class:`ConfigError` naming the file and key. The resolved config is saved
next to every output (shard manifest, run folder) so a result always says how it was made. The
dataclasses themselves live with their stage: ``simulate/config.py``, ``ingest/config.py``,
``train/config.py``.
"""

from __future__ import annotations

import math
import types
import typing
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")
Range = tuple[float, float]


# --------------------------------------------------------------------------------------- machinery
def _is_range(tp) -> bool:
    return tp == Range or (typing.get_origin(tp) is tuple and typing.get_args(tp) == (float, float))


def _coerce(tp, value, where: str):
    """Convert a YAML value to the annotated type ``tp`` or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, where)
    if is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return from_dict(tp, value, where)
    if _is_range(tp):
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise ConfigError(f"{where}: expected a [min, max] pair, got {value!r}")
        lo, hi = (_coerce(float, v, where) for v in value)
        if lo > hi:
            raise ConfigError(f"{where}: impossible range [{lo}, {hi}] (min > max)")
        return (lo, hi)
    if origin is list:
        (item,) = typing.get_args(tp) or (Any,)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):  # NaN passes every range comparison; inf gives NaN images
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from a (possibly partial) dict; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (expected one of: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate:
        validate(where)
    return obj


def merge(base, overrides: dict, where: str = "config"):
    """Return a copy of dataclass ``base`` with ``overrides`` (nested dicts) applied and validated."""
    data = to_dict(base)

    def deep(dst: dict, src: dict):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                deep(dst[k], v)
            else:
                dst[k] = v

    deep(data, overrides)
    return from_dict(type(base), data, where)


def to_dict(obj) -> dict:
    """Plain-data (YAML/JSON-able) copy of a config dataclass; tuples become lists."""

    def plain(v):
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(asdict(obj))


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return data


def dump_yaml(obj) -> str:
    return yaml.safe_dump(to_dict(obj) if is_dataclass(obj) else obj, sort_keys=False)


def check_range(
    where: str, name: str, rng: Range, lo: float | None = None, hi: float | None = None, strict_lo: bool = False
) -> None:
    a, b = rng
    if a > b:
        raise ConfigError(f"{where}.{name}: impossible range [{a}, {b}] (min > max)")
    if lo is not None and (a <= lo if strict_lo else a < lo):
        raise ConfigError(f"{where}.{name}: range [{a}, {b}] must be {'>' if strict_lo else '>='} {lo}")
    if hi is not None and b > hi:
        raise ConfigError(f"{where}.{name}: range [{a}, {b}] must be <= {hi}")


def check_fraction(where: str, name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{where}.{name}: {value} is not a fraction in [0, 1]")
