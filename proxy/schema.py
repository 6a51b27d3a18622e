"""JSON-Schema validation with errors that read `file: path: expected`."""

from __future__ import annotations

import json
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


def load_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: {where}{problem}") from None


def validate(name: str, data: Any, path: str) -> None:
    """Raise ConfigError naming `path`, the key path inside it, and what was expected."""
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


def _shown(value: Any) -> str:
    """A value for an error message, with URL credentials (redis://:secret@host) masked."""
    text = repr(value)
    return _USERINFO.sub(r"\1***@", text) if isinstance(value, str) else text


def _expected(err: jsonschema.ValidationError) -> str:
    v, arg = err.validator, err.validator_value
    inst = err.instance
    shown = _shown(inst)
    if v != "type" and isinstance(err.schema, dict) and "x-expected" in err.schema:
        return f"expected {err.schema['x-expected']}, got {shown}"
    if v == "additionalProperties":
        known = set(err.schema.get("properties", {}))
        extra = sorted(str(k) for k in inst if k not in known)
        return f"unknown key '{extra[0]}'" if extra else err.message
    if v == "required":
        missing = [k for k in arg if k not in inst]
        return f"missing required key '{missing[0]}'"
    if v == "type":
        return f"expected {_names(arg)}, got {shown}"
    if v == "minimum":
        return f"expected a number >= {arg}, got {shown}"
    if v == "maximum":
        return f"expected a number <= {arg}, got {shown}"
    if v == "enum":
        return f"expected one of {', '.join(map(str, arg))}; got {shown}"
    if v == "const":
        return f"expected {arg!r}, got {shown}"
    if v == "minLength":
        return "expected a non-empty string"
    if v == "pattern":
        return f"expected a string matching {arg}, got {shown}"
    if v == "exclusiveMinimum":
        return f"expected a number > {arg}, got {shown}"
    if v in ("minProperties", "minItems"):
        return "expected at least one entry"
    return err.message
