"""Configuration files (YAML or JSON) -> nested dataclasses, with errors that name the field and the value.

WHY our own small loader: a typo in a config (``blok_shape``) must stop the run before hours of cluster time,
with one line saying which field in which file, not a traceback from deep inside a stage. Dataclasses stay the
single description of each config section (defaults, types, docs); this module only checks values against
their type hints.

Supported field types: bool, int, float (ints accepted), str, pathlib.Path, None/Optional, Literal, Enum,
list[T], tuple[T, ...], tuple[A, B, C], dict[str, T], nested dataclasses, Union, Any.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import types
import typing
from pathlib import Path
from typing import Any, Mapping, TypeVar

import yaml

from storage.errors import ConfigError

T = TypeVar("T")
_MISSING = object()


def load_config(path_or_dict: str | Path | Mapping[str, Any], cls: type[T], *, source: str | None = None) -> T:
    """Build `cls` (a dataclass) from a YAML/JSON file or an already-parsed mapping.

    Raises ConfigError naming the source, the field path (``segment.block_shape``) and the offending value for
    unknown fields, missing required fields, wrong types or values; nothing else escapes for bad input.
    """
    if isinstance(path_or_dict, (str, Path)):
        path = Path(path_or_dict)
        data = read_config_file(path)
        source = source or path.name
    else:
        data = path_or_dict
        source = source or "config"
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"load_config needs a dataclass, got {cls!r}")  # a programming error, not input
    try:
        return _convert(data, cls, "", source)
    except RecursionError:
        raise ConfigError(f"{source}: configuration is nested too deeply") from None


def read_config_file(path: Path) -> Any:
    """Parse YAML or JSON (by suffix; YAML otherwise, which also reads JSON)."""
    shown, name = _one_line(str(path)), _one_line(path.name)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {shown} not found") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # ValueError: a NUL byte in the path
        raise ConfigError(f"config file {shown} cannot be read: {exc}") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        return yaml.safe_load(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{name}: invalid YAML{where}: {problem}") from None
    except (RecursionError, ValueError, TypeError) as exc:
        raise ConfigError(f"{name}: cannot parse: {exc}") from None


def _one_line(text: str) -> str:
    """A path as typed, or quoted with escapes when it holds a newline or other unprintable character (an error is
    one line)."""
    return text if text.isprintable() else repr(text)


def dump_config(obj: Any) -> Any:
    """A dataclass config as plain JSON/YAML-able data (inverse of load_config)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: dump_config(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, (list, tuple)):
        return [dump_config(v) for v in obj]
    if isinstance(obj, dict):
        return {k: dump_config(v) for k, v in obj.items()}
    return obj


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _field_name(path: str) -> str:
    return f"field {path!r}" if path else "the top level"  # repr: a key with a newline stays on one line


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "null"
    if isinstance(tp, type):
        return {"str": "a string", "int": "an integer", "float": "a number", "bool": "true/false",
                "Path": "a path", "dict": "a mapping", "list": "a list"}.get(tp.__name__, tp.__name__)
    return str(tp).replace("typing.", "")


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _convert(value: Any, tp: Any, path: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{_field_name(path)} in {source}: expected {expected}, got {_describe(value)}")

    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        return _convert_dataclass(value, tp, path, source)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _convert(value, option, path, source)
            except ConfigError as exc:
                errors.append(exc)
        if len(errors) == 1:
            raise errors[0]
        raise bad(" or ".join(_type_name(a) for a in args))
    if origin is typing.Literal:
        if value in args and type(value) in {type(a) for a in args}:
            return value
        raise bad("one of " + ", ".join(repr(a) for a in args))
    if tp is type(None):
        if value is None:
            return None
        raise bad("null")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or (isinstance(value, str) and value == member.name):
                return member
        raise bad("one of " + ", ".join(repr(m.value) for m in tp))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad("true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad("an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad("a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad("a string")
    if tp is Path:
        if isinstance(value, str) and value and "\x00" not in value:
            return Path(value)
        raise bad("a path")
    if origin in (list, typing.List) or tp is list:
        if not isinstance(value, (list, tuple)):
            raise bad("a list")
        item = args[0] if args else Any
        return [_convert(v, item, f"{path}[{i}]", source) for i, v in enumerate(value)]
    if origin in (tuple, typing.Tuple) or tp is tuple:
        if not isinstance(value, (list, tuple)):
            raise bad(f"a list of {len(args)} values" if args and args[-1] is not Ellipsis else "a list")
        if not args:
            return tuple(value)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{path}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise bad(f"a list of {len(args)} values")
        return tuple(_convert(v, a, f"{path}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin in (dict, typing.Dict) or tp is dict:
        if not isinstance(value, Mapping):
            raise bad("a mapping")
        key_tp, val_tp = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            sub = f"{path}.{k}" if path else str(k)
            out[_convert(k, key_tp, sub, source)] = _convert(v, val_tp, sub, source)
        return out
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise bad(_type_name(tp))
    raise TypeError(f"load_config: unsupported field type {tp!r} at {path or 'top level'}")  # programming error


def _convert_dataclass(value: Any, cls: type, path: str, source: str) -> Any:
    if value is None and not path:
        value = {}  # an empty file means "all defaults"
    if not isinstance(value, Mapping):
        raise ConfigError(f"{_field_name(path)} in {source}: expected a mapping of {cls.__name__} fields, "
                          f"got {_describe(value)}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = _hints(cls)
    for key in value:
        if not isinstance(key, str) or key not in fields:
            full = f"{path}.{key}" if path else str(key)
            hint = ""
            if isinstance(key, str):
                import difflib

                close = difflib.get_close_matches(key, list(fields), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
            known = ", ".join(fields)
            raise ConfigError(f"unknown field {full!r} in {source}{hint}; known fields here: {known}")
    kwargs = {}
    for name, f in fields.items():
        sub = f"{path}.{name}" if path else name
        if name in value:
            kwargs[name] = _convert(value[name], hints[name], sub, source)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required field '{sub}' in {source}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{_field_name(path)} in {source}: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{_field_name(path)} in {source}: {exc}") from None
