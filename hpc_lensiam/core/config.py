"""The configuration machinery every stage's typed config uses: dataclasses from YAML, validated once.

Ranges are ``(min, max)`` pairs written as two-element YAML lists. Unknown keys, wrong types and
impossible ranges raise :class:`ConfigError` naming the file and key. The resolved config is saved
next to every output (shard manifest, run folder) so a result always says how it was made. The
dataclasses themselves live with their stage: ``simulate/config.py``, ``ingest/config.py``,
``train/config.py``.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import MISSING, asdict, field, fields, is_dataclass
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
    """Build dataclass ``cls`` from a (possibly partial) dict; missing keys keep their defaults.

    Types are coerced, values of fields with ``choices`` (:func:`option`) checked, then ``validate``."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (expected one of: {', '.join(sorted(known))})")
    kwargs = {k: _coerce(hints[k], v, f"{where}.{k}") for k, v in data.items()}
    for f in fields(cls):
        allowed = choices_of(cls, f) if f.name in kwargs else None
        value = kwargs.get(f.name)
        for v in value if isinstance(value, list) else [value]:
            if allowed and v is not None and v not in allowed:
                raise ConfigError(f"{where}.{f.name}: {v!r} is not one of {', '.join(map(str, allowed))}")
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


# ------------------------------------------------------------------------------- command options
# A command's config is a dataclass whose fields are declared with :func:`option`: the default is
# written once, with the help text, the allowed values and the flag's spelling. The CLI generates
# its parser from these fields; :func:`resolve` merges a ``--config`` YAML file and the flags given,
# validates once, and names a bad value by its flag (``--arch``), or by the file and key it came from.
FLAGS = "flags"


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    choices: tuple | typing.Callable[[], tuple] | None = None,
    flag: str | None = None,
    short: str | None = None,
    metavar: str | None = None,
    positional: bool = False,
    required: bool = False,
    default_factory: Any = MISSING,
):
    """A config field that is also a command-line flag.

    ``choices``: allowed values (or a function returning them, called only when that command's parser
    is built or a value is checked: e.g. the backbone names, which import torch). ``flag``: the flag
    when it is not ``--field-name``; ``short``: a one-letter alias; ``positional``: a positional
    argument; ``required``: must be given, by the flag or in the ``--config`` file (default None)."""
    meta = {"help": help, "choices": choices, "flag": flag, "short": short, "metavar": metavar}
    meta.update(positional=positional, required=required)
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=None if default is MISSING else default, metadata=meta)


def option_meta(cls, f) -> dict:
    """A field's option metadata: :func:`option`'s, or the class's ``FLAG_META[name]`` (configs whose
    field list is written as plain defaults)."""
    return {**f.metadata, **getattr(cls, "FLAG_META", {}).get(f.name, {})}


def choices_of(cls, f) -> tuple | None:
    allowed = option_meta(cls, f).get("choices")
    return tuple(allowed()) if callable(allowed) else allowed


def flag_of(cls, name: str) -> str:
    """The flag that sets field ``name`` of ``cls`` (``batch_size`` -> ``--batch-size``)."""
    for f in fields(cls):
        if f.name == name:
            meta = option_meta(cls, f)
            if meta.get("positional"):
                return name.upper()
            return meta.get("flag") or "--" + name.replace("_", "-")
    return name


def name_flags(message: str, cls, file_keys=(), path=None) -> str:
    """``flags.batch_size: ...`` -> ``--batch-size: ...`` (or ``FILE.batch_size`` where the value came
    from the ``--config`` file ``path``); a leading ``flags: `` is dropped."""

    def one(m):
        name = m.group(1)
        return f"{path}.{name}" if name in file_keys else flag_of(cls, name)

    message = re.sub(rf"\b{FLAGS}\.([A-Za-z_]\w*)", one, message)
    return message[len(FLAGS) + 2 :] if message.startswith(f"{FLAGS}: ") else message


def resolve(cls: type[T], config_path: str | Path | None = None, flags: dict | None = None) -> T:
    """A command's config: defaults <- the ``--config`` YAML file <- the flags given (None: not given),
    validated once; every error names the flag or the file's key. Required options are checked last."""
    data = read_yaml(config_path) if config_path else {}
    known = {f.name for f in fields(cls) if f.init}
    unknown = sorted(set(data) - known)
    if unknown:  # a key of no option: named by the file
        raise ConfigError(
            f"{config_path}: unknown key {unknown[0]!r} (expected one of: {', '.join(sorted(known))}; "
            f"`hpc-lensiam config COMMAND` prints them all)"
        )
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    file_keys = set(data) - set(flags)
    try:
        obj = from_dict(cls, {**data, **flags}, FLAGS)
    except ConfigError as exc:
        raise ConfigError(name_flags(str(exc), cls, file_keys, config_path)) from None
    for f in fields(cls):
        if option_meta(cls, f).get("required") and getattr(obj, f.name) in (None, "", []):
            raise ConfigError(f"{flag_of(cls, f.name)}: required (the flag, or key {f.name} in --config)")
    return obj


def from_flags(cls: type[T], values: dict) -> T:
    """:func:`resolve` without a file: the Python API's keyword arguments (None: the default)."""
    return resolve(cls, None, values)
