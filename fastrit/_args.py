"""Checks of scalar arguments (counts, indices, fractions), each raising an error that names the argument.

Every public function of fastrit checks its integer and fractional arguments here, so one rule holds everywhere:
a bool is not an integer (``True`` is not a batch size), and a message reads
``"<name>: expected <what>, got <value>"``. Tensor arguments of the ops are checked in :mod:`fastrit.ops._checks`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["flag", "integer", "is_integer", "number", "one_of", "positive"]


def is_integer(value: Any) -> bool:
    """Whether ``value`` is a Python ``int`` and not a ``bool``."""
    return isinstance(value, int) and not isinstance(value, bool)


def _integer_what(low: int | None, high: int | None) -> str:
    if high is not None:
        return f"an integer in [{0 if low is None else low}, {high})"
    if low == 1:
        return "a positive integer"
    if low == 0:
        return "a non-negative integer"
    return "an integer" if low is None else f"an integer >= {low}"


def integer(name: str, value: Any, *, low: int | None = None, high: int | None = None, optional: bool = False,
            what: str | None = None, type_error: bool = False) -> Any:
    """``value`` itself when it is an integer with ``low <= value < high`` (either bound may be None), or None
    when ``optional``; else ``ValueError("<name>: expected <what>, got <value!r>")``.

    ``what`` defaults to "a positive integer" (``low=1``), "a non-negative integer" (``low=0``) or "an integer in
    [low, high)", preceded by "None or " when ``optional``. ``type_error``: raise TypeError, not ValueError, for a
    value that is not an integer at all (its message then names the type).
    """
    if optional and value is None:
        return None
    expected = ("None or " if optional else "") + (what or _integer_what(low, high))
    if not is_integer(value):
        if type_error:
            raise TypeError(f"{name}: expected {expected}, got {type(value).__name__}")
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    if (low is not None and value < low) or (high is not None and value >= high):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def positive(name: str, value: Any, *, optional: bool = False, what: str | None = None) -> Any:
    """``integer(name, value, low=1, optional=optional, what=what)``: a count, a size, a number of bytes."""
    return integer(name, value, low=1, optional=optional, what=what)


def number(name: str, value: Any, *, low: float, high: float, low_open: bool = True, high_open: bool = False,
           optional: bool = False, what: str | None = None) -> Any:
    """``value`` itself when it is an int or float (not a bool) inside the interval from ``low`` to ``high``
    (``low_open`` / ``high_open``: that end excluded; default ``(low, high]``), or None when ``optional``; else
    ``ValueError("<name>: expected a number in (low, high], got <value!r>")`` (``what`` replaces "a number in
    (low, high]")."""
    if optional and value is None:
        return None
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    interval = f"{left}{low:g}, {high:g}{right}"
    expected = ("None or " if optional else "") + (what or f"a number in {interval}")
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below):
        raise ValueError(f"{name}: expected {expected}, got {value!r}")
    return value


def one_of(name: str, value: Any, choices: Any, *, what: str | None = None) -> Any:
    """``value`` itself when it is in ``choices``; else ``ValueError("<name>: expected <what>, got <value!r>")``,
    ``what`` by default "one of <choices>"."""
    if value not in choices:
        raise ValueError(f"{name}: expected {what or f'one of {choices}'}, got {value!r}")
    return value


def flag(name: str, value: Any, *, type_error: bool = False) -> bool:
    """``value`` itself when it is True or False; else ``ValueError("<name>: expected True or False, got
    <value!r>")`` (TypeError with ``type_error``)."""
    if not isinstance(value, bool):
        raise (TypeError if type_error else ValueError)(f"{name}: expected True or False, got {value!r}")
    return value
