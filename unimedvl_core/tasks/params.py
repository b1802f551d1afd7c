"""Typed task parameters: a name, a type, a default, limits and help, and the one parser every surface uses.

A value may arrive as a Python object (API, bundle JSON, MAP YAML, server JSON) or as text (command line,
form fields); ``Param.parse`` turns either into the declared type or raises ``TaskParameterError`` naming
the parameter and the form it expects.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Param", "TaskParameterError", "PARAM_TYPES"]

# The value types a parameter may have; "interval" is a (start, end) pair of floats.
PARAM_TYPES = ("int", "float", "str", "bool", "interval")


class TaskParameterError(ValueError):
    """A task parameter that is unknown, missing, of the wrong form or outside its limits."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class Param:
    """One parameter of a task.

    Args:
        name: the canonical name (Python keyword, bundle/MAP key, server field; ``--name-with-dashes`` on the CLI).
        type: one of ``PARAM_TYPES``.
        default: used when the caller gives nothing; ``None`` means "decided by the model" (e.g. its size).
        required: the caller must give a value (then ``default`` is unused).
        choices: the allowed values, if a closed set.
        minimum, maximum: inclusive bounds for numbers; ``max_length`` for text.
        exclusive_minimum: the value must be strictly above ``minimum``.
        limit: the name of a checkpoint-dependent limit (``"image_side"``) checked against the model's limits.
        flags: extra command-line spellings kept for existing scripts (e.g. ``--steps``).
        plural: a list form surfaces accept to run the task once per value (``questions`` for ``question``).
    """

    name: str
    type: str
    default: Any = None
    help: str = ""
    required: bool = False
    choices: tuple | None = None
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False
    max_length: int | None = None
    limit: str | None = None
    flags: tuple[str, ...] = ()
    plural: str | None = None
    metavar: str | None = field(default=None, compare=False)

    def __post_init__(self):
        if self.type not in PARAM_TYPES:
            raise ValueError(f"parameter {self.name}: type must be one of {PARAM_TYPES}, got {self.type!r}")

    @property
    def form(self) -> str:
        """The expected form, for error messages and help."""
        if self.choices:
            return "one of " + ", ".join(str(c) for c in self.choices)
        return {"int": "an integer", "float": "a number", "str": "text", "bool": "true or false",
                "interval": "START,END (two numbers, 0 <= START <= END <= 1)"}[self.type]

    def _fail(self, value: Any, why: str | None = None) -> TaskParameterError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return TaskParameterError(f"{self.name}: {why or 'expected ' + self.form} (got {shown})")

    def _convert(self, value: Any) -> Any:
        if self.type == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text in _TRUE | _FALSE:
                return text in _TRUE
            raise self._fail(value)
        if self.type == "interval":
            return self._interval(value)
        if self.type == "str":
            if not isinstance(value, str):
                raise self._fail(value)
            return value
        if isinstance(value, bool):
            raise self._fail(value)
        try:
            number = float(value) if self.type == "float" else _as_int(value)
        except (TypeError, ValueError):
            raise self._fail(value) from None
        return number

    def _interval(self, value: Any) -> tuple[float, float]:
        parts = value.split(",") if isinstance(value, str) else value
        try:
            lo, hi = (float(v) for v in parts)
        except (TypeError, ValueError):
            raise self._fail(value) from None
        if not 0.0 <= lo <= hi <= 1.0:
            raise self._fail(value, "must satisfy 0 <= START <= END <= 1")
        return lo, hi

    def _check_range(self, value: Any) -> None:
        if self.choices is not None and value not in self.choices:
            raise self._fail(value)
        if self.type in ("int", "float"):
            low_ok = self.minimum is None or (value > self.minimum if self.exclusive_minimum else value >= self.minimum)
            if not low_ok or (self.maximum is not None and value > self.maximum):
                raise self._fail(value, f"must be {self.bounds}")
        if self.type == "str":
            if self.required and not value.strip():
                raise self._fail(value, "must not be empty")
            if self.max_length is not None and len(value) > self.max_length:
                raise TaskParameterError(f"{self.name}: longer than {self.max_length} characters")

    @property
    def bounds(self) -> str:
        """The limits in words ("> 0 and <= 10", "at most 4000 characters"); empty when there are none."""
        if self.type == "str":
            return f"at most {self.max_length} characters" if self.max_length is not None and not self.choices else ""
        if self.type not in ("int", "float"):
            return ""
        low = None if self.minimum is None else f"{'>' if self.exclusive_minimum else '>='} {_number(self.minimum)}"
        high = None if self.maximum is None else f"<= {_number(self.maximum)}"
        return " and ".join(b for b in (low, high) if b)

    def parse(self, value: Any) -> Any:
        """The value in the declared type, checked against choices, bounds and length; ``None`` passes through
        when the parameter is optional."""
        if value is None:
            if self.required:
                raise TaskParameterError(f"{self.name}: required")
            return None
        value = self._convert(value)
        self._check_range(value)
        return value

    def describe(self) -> dict:
        """A JSON-ready description (the ``unimedvl tasks --json`` and ``GET /v1/tasks`` document)."""
        out = {"name": self.name, "type": self.type, "default": _jsonable(self.default), "required": self.required,
               "help": self.help}
        for key in ("choices", "minimum", "maximum", "max_length", "limit", "plural"):
            value = getattr(self, key)
            if value is not None:
                out[key] = _jsonable(value)
        if self.exclusive_minimum:
            out["exclusive_minimum"] = True
        return out


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def _as_int(value: Any) -> int:
    if isinstance(value, float) and not value.is_integer():
        raise ValueError("not an integer")
    return int(value)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, (tuple, Sequence)) and not isinstance(value, str) else value
