"""The one JSON converter and the η labels, torch-free (the analysis and the results folder
both use them; neither imports the other for it)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
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


def eta_label(eta: float) -> str:
    """Shortest round-trip text of η ('1e-05', '1.28e-05'): distinct η, distinct labels."""
    value = float(eta)
    if not math.isfinite(value):
        raise ValueError(f"learning rate must be finite, got {eta!r}")
    return repr(value)
