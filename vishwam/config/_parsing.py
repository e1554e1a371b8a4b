"""Config files and flags: field types, `--set FIELD=VALUE` parsing, JSON round trip, diffs.

`JsonConfig` is the base of the frozen config dataclasses (`ModelConfig`, `TrainConfig`): it
checks field types (a `ValueError` naming the field, the value and the fix), parses
command-line overrides with the field's type and reads and writes JSON (no pickle).
`config_diff` is the one comparison of two configs, used on resume and by `diff`.
"""

import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from ..errors import InvalidValueError


def _field_kinds(annotation: Any) -> tuple[type, bool]:
    """`(base type, accepts None)` of a config field's annotation (`int`, `float | None`, a Literal)."""
    optional = False
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        optional, (annotation,) = True, args
    if typing.get_origin(annotation) is Literal:
        annotation = str
    return annotation, optional


def _type_error(cls_name: str, name: str, value: Any, kind: type, optional: bool, default: Any) -> str | None:
    """Why `value` does not fit a field of type `kind`, or None. Bools are not numbers
    here, ints are not floats' only stand-ins the other way round: 2.0 is no int."""
    if value is None:
        return None if optional else f"{cls_name}.{name}: must be set, got None; give a {kind.__name__}."
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return f"{cls_name}.{name}: must be a finite number, got {value!r}."
    else:
        ok = isinstance(value, kind)
    if ok:
        return None
    expected = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(kind, kind.__name__)
    return (f"{cls_name}.{name}: expected {expected}{' or null' if optional else ''}, got {value!r} "
            f"({type(value).__name__}); write e.g. {name}={_example(kind, default)}.")


def _example(kind: type, default: Any) -> str:
    """A value of the right type to show in a message: the field's default where it has one."""
    if default is not None and default is not dataclasses.MISSING:
        return json.dumps(default)
    return {bool: "true", int: "2", float: "0.5", str: '"value"'}.get(kind, "...")


def _parse_text(cls_name: str, name: str, text: str, kind: type, optional: bool, default: Any) -> Any:
    lowered = text.strip().lower()
    if optional and lowered in ("none", "null"):
        return None
    try:
        if kind is bool:
            if lowered in ("true", "false"):
                return lowered == "true"
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
    except ValueError:
        expected = {bool: "true or false", int: "an integer", float: "a number"}[kind]
        raise InvalidValueError(f"{cls_name}.{name}: expected {expected}{' or none' if optional else ''}, got {text!r}; "
                                f"write e.g. {name}={_example(kind, default)}.") from None
    if len(text) >= 2 and text[0] == text[-1] == '"':
        return text[1:-1]
    return text


# The config classes check their own field types (`_check_types`: a ValueError naming the field,
# the value and the fix); `no_type_check` keeps a run-time type checker (jaxtyping's import hook
# in the tests) from refusing a bad value first with a generic TypeError.
@typing.no_type_check
class JsonConfig:
    """JSON round trip shared by the config dataclasses (no pickle: configs are JSON)."""

    def _check_types(self) -> None:
        """Raise `ValueError` naming the first field whose value has the wrong type."""
        for field in dataclasses.fields(self):
            kind, optional = _field_kinds(field.type)
            message = _type_error(type(self).__name__, field.name, getattr(self, field.name), kind, optional,
                                  field.default)
            if message:
                raise InvalidValueError(message)

    @classmethod
    def unknown_field_error(cls, name: str) -> InvalidValueError:
        """The error for a field `cls` does not have, with the closest known name."""
        known = [f.name for f in dataclasses.fields(cls)]
        close = difflib.get_close_matches(str(name), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"known fields are {', '.join(sorted(known))}."
        return InvalidValueError(f"{cls.__name__}: unknown field {name!r}; {hint}")

    @classmethod
    def parse_override(cls, assignment: str) -> tuple[str, Any]:
        """`"FIELD=VALUE"` (a `--set` argument) as `(field, value)`, VALUE parsed with the field's type.

        Bools take `true`/`false`, optional fields `none`/`null`, strings are taken as written
        (quotes optional). Raises `ValueError` for a missing `=`, an unknown field (naming the
        closest one) or a value that does not parse as the field's type.
        """
        name, sep, text = assignment.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InvalidValueError(f"--set {assignment!r}: expected FIELD=VALUE, e.g. --set num_layers=2.")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if name not in fields:
            raise cls.unknown_field_error(name)
        kind, optional = _field_kinds(fields[name].type)
        return name, _parse_text(cls.__name__, name, text, kind, optional, fields[name].default)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        if not isinstance(data, dict):
            raise InvalidValueError(f"{cls.__name__}: expected a JSON object of fields, got {type(data).__name__}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known, key=str)
        if unknown:
            raise cls.unknown_field_error(unknown[0])
        return cls(**data)

    @classmethod
    def from_json(cls, text_or_path: "str | Path"):
        """Parse a JSON string, or read the file it names."""
        text, where = str(text_or_path), "the JSON string"
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise FileNotFoundError(f"{cls.__name__}.from_json: no such file {path}")
            where = str(path)
            try:
                text = path.read_text(encoding="utf-8")
            except UnicodeDecodeError as error:
                raise InvalidValueError(f"{cls.__name__}.from_json: {path} is not UTF-8 text ({error}).") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise InvalidValueError(f"{cls.__name__}.from_json: {where} is not valid JSON ({error}).") from None
        return cls.from_dict(data)

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)

    def diff(self, other) -> dict[str, tuple[Any, Any]]:
        """Fields whose values differ: `{name: (self_value, other_value)}` (see `config_diff`)."""
        return config_diff(self.to_dict(), other.to_dict())


def config_diff(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Fields whose values differ, nested dicts flattened to dotted names.

    Returns `{field: (saved_value, current_value)}`; a field present on one side
    only has the string `"<absent>"` on the other. Values are compared as JSON, so
    a config read back from a file (lists) equals the live one (tuples).
    """
    absent = "<absent>"
    diff: dict[str, tuple[Any, Any]] = {}

    def walk(a: Mapping[str, Any], b: Mapping[str, Any], prefix: str):
        for name in sorted(set(a) | set(b), key=str):
            x, y = a.get(name, absent), b.get(name, absent)
            field = f"{prefix}{name}"
            if isinstance(x, Mapping) and isinstance(y, Mapping):
                walk(x, y, field + ".")
            elif _json_normal(x) != _json_normal(y):
                diff[field] = (x, y)

    walk(saved, current, "")
    return diff


def _json_normal(value: Any) -> Any:
    return json.loads(json.dumps(value, sort_keys=True, default=str))


