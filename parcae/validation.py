"""Strict checks of typed configuration: every field annotated with a ``Literal`` accepts only its listed values.

The allowed values are read from the annotation itself (``typing.get_args``), so there is no second copy of a
set of choices to keep in step. Used by the model, optimizer, schedule and depth-sampler configs::

    check_choices(config)                       # a dataclass instance
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

from .errors import ConfigError  # relative: this file also travels in exported Hugging Face folders


def allowed_values(annotation: Any) -> tuple | None:
    """The values a ``Literal[...]`` (or ``Optional[Literal[...]]``) annotation admits; ``None`` for other types."""
    if typing.get_origin(annotation) is Literal:
        return typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        values: list = []
        for arg in typing.get_args(annotation):
            if arg is type(None):
                values.append(None)
            elif typing.get_origin(arg) is Literal:
                values.extend(typing.get_args(arg))
            else:
                return None  # a union with a free type: not a fixed set
        return tuple(values) if values and any(v is not None for v in values) else None
    return None


def _check(owner: str, name: str, value: Any, annotation: Any) -> None:
    choices = allowed_values(annotation)
    if choices is not None and value not in choices:
        shown = ", ".join(repr(c) for c in choices)
        raise ConfigError(f"{owner}.{name} must be one of {shown}; got {value!r}")


def check_choices(config: Any) -> None:
    """Raise :class:`ConfigError` naming the first field of a dataclass instance whose value is not allowed."""
    hints = typing.get_type_hints(type(config))
    for field in dataclasses.fields(config):
        _check(type(config).__name__, field.name, getattr(config, field.name), hints.get(field.name))
