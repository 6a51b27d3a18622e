"""JSON-Schema validation with errors that read `file: path: expected`."""

from __future__ import annotations

import json
import math
import re
from functools import lru_cache
from importlib import resources
from typing import Any

import jsonschema
import yaml

from .errors import ConfigError

_TYPE_NAMES = {"object": "a mapping", "array": "a list", "string": "a string",
               "integer": "an integer", "number": "a number", "boolean": "true or false",
               "null": "null"}


@lru_cache(maxsize=None)
def validator(name: str) -> jsonschema.protocols.Validator:
    text = resources.files("proxy").joinpath("schemas", f"{name}.schema.json").read_text()
    schema = json.loads(text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


class _Loader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error: PyYAML would
    keep the last silently, and a budget limit written twice is a mistake, not a choice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":    # `<<: *base` may override on purpose
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first[key]})",
                        key_node.start_mark)
                first[key] = key_node.start_mark.line + 1
            except TypeError:                                # unhashable: the base class says so
                continue
        return super().construct_mapping(node, deep)


# YAML 1.1 (PyYAML) reads `1e3` and `1e400` as strings; YAML 1.2 and every JSON reader as numbers.
# Read them as numbers: `usd: 1e3` is a limit of 1000, and `1e400` overflows to .inf, which
# `validate` rejects by name.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def load_yaml(path: str) -> Any:
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x}); "
                          f"save the file as UTF-8") from None
    try:
        return yaml.load(text, Loader=_Loader)   # noqa: S506 - _Loader is a SafeLoader
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: {where}{problem}") from None


def _non_finite(data: Any, path: tuple = ()) -> tuple[tuple, float] | None:
    """The first .inf / -.inf / .nan (1e400 reads as .inf) in data, with its key path."""
    if isinstance(data, float) and not math.isfinite(data):
        return path, data
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    for key, value in items:
        found = _non_finite(value, (*path, key))
        if found is not None:
            return found
    return None


def validate(name: str, data: Any, path: str) -> None:
    """Raise ConfigError naming `path`, the key path inside it, and what was expected."""
    # JSON Schema has no finite-number check: .nan passes every bound, and .inf passes `minimum`.
    found = _non_finite(data)
    if found is not None:
        where, value = found
        spelled = ".nan" if math.isnan(value) else ".inf" if value > 0 else "-.inf"
        raise ConfigError(f"{path}: {_where(where)}: expected a finite number, got {spelled}")
    errors = sorted(validator(name).iter_errors(data), key=lambda e: (len(e.path), list(map(str, e.path))))
    if errors:
        err = errors[0]
        raise ConfigError(f"{path}: {_where(err.path)}: {_expected(err)}")


def _where(parts) -> str:
    return ".".join(str(p) for p in parts) or "(top level)"


def _names(types: Any) -> str:
    types = [types] if isinstance(types, str) else list(types)
    return " or ".join(_TYPE_NAMES.get(t, t) for t in types)


_USERINFO = re.compile(r"(//)[^/@\s]*@")


def shown(value: Any) -> str:
    """A value for an error message, with URL credentials (redis://:secret@host) masked."""
    text = repr(value)
    return _USERINFO.sub(r"\1***@", text) if isinstance(value, str) else text


def _expected(err: jsonschema.ValidationError) -> str:
    v, arg = err.validator, err.validator_value
    inst = err.instance
    got = shown(inst)
    if v != "type" and isinstance(err.schema, dict) and "x-expected" in err.schema:
        return f"expected {err.schema['x-expected']}, got {got}"
    if v == "additionalProperties":
        known = set(err.schema.get("properties", {}))
        extra = sorted(str(k) for k in inst if k not in known)
        return f"unknown key '{extra[0]}'" if extra else err.message
    if v == "required":
        missing = [k for k in arg if k not in inst]
        return f"missing required key '{missing[0]}'"
    if v == "type":
        return f"expected {_names(arg)}, got {got}"
    if v == "minimum":
        return f"expected a number >= {arg}, got {got}"
    if v == "maximum":
        return f"expected a number <= {arg}, got {got}"
    if v == "enum":
        return f"expected one of {', '.join(map(str, arg))}; got {got}"
    if v == "const":
        return f"expected {arg!r}, got {got}"
    if v == "minLength":
        return "expected a non-empty string"
    if v == "pattern":
        return f"expected a string matching {arg}, got {got}"
    if v == "exclusiveMinimum":
        return f"expected a number > {arg}, got {got}"
    if v in ("minProperties", "minItems"):
        return "expected at least one entry"
    return err.message
