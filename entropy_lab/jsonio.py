"""The one JSON converter (both ways) and the η labels, torch-free (the analysis and the
results folder both use them; neither imports the other for it)."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from collections.abc import Mapping
from enum import Enum
from typing import Any


def json_safe(obj: Any) -> Any:
    """Plain JSON types: NaN/±inf → None, numpy scalars/arrays and tensors → Python values,
    tuples → lists, paths → str, mapping keys → str."""
    if obj is None or isinstance(obj, (str, bool)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist"):  # numpy arrays and scalars, torch tensors
        return json_safe(obj.tolist())
    if hasattr(obj, "item"):
        return json_safe(obj.item())
    if hasattr(obj, "to_dict"):
        return json_safe(obj.to_dict())
    raise TypeError(f"cannot store a {type(obj).__name__} as JSON")


def from_json(tp: Any, value: Any) -> Any:
    """``value`` read back from JSON as the type ``tp`` (a dataclass, built recursively from
    its fields' annotations; list, dict, Optional, Enum): the inverse of :func:`json_safe`.

    A ``None`` where a plain ``float`` is annotated was a NaN (json_safe wrote it so) and
    becomes NaN again; dict keys are converted back (``"1e-05"`` → 1e-05 for ``float``); a
    dataclass field missing from ``value`` takes its default. Numbers are kept as written,
    so the object writes the same JSON again.
    """
    if value is None:
        return math.nan if tp is float else None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp)
        return tp(
            **{
                f.name: from_json(hints[f.name], value[f.name])
                for f in dataclasses.fields(tp)
                if f.init and f.name in value
            }
        )
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        return from_json(kinds[0], value) if len(kinds) == 1 else value
    if origin is list:
        return [from_json(args[0], v) for v in value]
    if origin in (dict, Mapping) and args:
        return {from_json(args[0], k): from_json(args[1], v) for k, v in value.items()}
    if tp in (float, int) and isinstance(value, str):  # a JSON object's key
        return tp(value)
    if isinstance(tp, type) and issubclass(tp, Enum):
        return tp(value)
    return value


def eta_label(eta: float) -> str:
    """Shortest round-trip text of η ('1e-05', '1.28e-05'): distinct η, distinct labels."""
    value = float(eta)
    if not math.isfinite(value):
        raise ValueError(f"learning rate must be finite, got {eta!r}")
    return repr(value)
