"""The record: one (η, repeat) measurement of raw_results.json, self-describing.

Torch-free and free of the analysis, so the sweep (protocol), the results folder (store)
and the analysis all read and write it without importing one another.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["EPS", "RECORD_SCHEMA_VERSION", "PointRecord", "as_records", "finite"]

RECORD_SCHEMA_VERSION = 2  # 2: self-describing (dtype, eps), rounding term
EPS = {"fp32": 2.0**-23, "fp64": 2.0**-52, "bf16": 2.0**-7}


def finite(value: Any) -> bool:
    """A real number (not a bool) that is finite: a measured value, not a failure's None."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class PointRecord:
    """One (η, repeat) measurement, self-describing: dtype, eps, reading, H₀ and the jet.

    ``to_dict()`` is the raw_results.json record (DESIGN §5 fields plus these); unknown
    keys of a stored record are kept in ``extra`` and written back unchanged.
    """

    learning_rate: float
    repeat: int
    seed: int | None = None
    success: bool = False
    reading: str = "policy"
    dtype: str | None = None  # the runtime dtype of θ (None: a schema-1 record)
    eps: float | None = None  # its machine epsilon
    entropy_before: float | None = None  # H(θ₀) in this record's reading
    entropy_after: float | None = None
    entropy_change: float | None = None  # ΔH(η) in this record's reading
    entropy_change_negative: float | None = None  # ΔH(−η): the symmetric noise check
    entropy_change_conditional: float | None = None
    entropy_change_policy: float | None = None
    ess: float | None = None
    # The jet along v_r at η = 0 (per unit η).
    first_order_slope: float | None = None  # ∇H·v
    first_order_prediction: float | None = None  # η·∇H·v
    first_order_slope_conditional: float | None = None
    curvature: float | None = None  # vᵀ∇²H v
    second_order_prediction: float | None = None
    third_derivative: float | None = None  # ∇³H[v, v, v]
    third_order_prediction: float | None = None
    identity_slope: float | None = None
    cui_vanilla_pg_slope: float | None = None
    cui_natural_pg_slope: float | None = None
    # Parameter rounding: ∇H·(θ₁ − θ₀ − η·v), θ₁ as stored in the runtime dtype.
    rounding_effect: float | None = None
    quantized_fraction: float | None = None
    # MoE: fraction of E's tokens whose top-k experts differ between θ₀ and θ₁ (None: dense).
    routing_changed_fraction: float | None = None
    update_norm: float | None = None
    grad_norm: float | None = None  # the RL gradient's norm before clipping
    momentum_share: float | None = None  # ‖v with a zero gradient‖ / ‖v‖ (1: momentum alone)
    groups_kept: int | None = None  # U's groups after the trainer's filters
    groups_dropped: int | None = None
    mean_reward: float | None = None
    duration_s: float | None = None
    direction_seconds: float | None = None
    error: str | None = None
    schema_version: int = RECORD_SCHEMA_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], dtype: str | None = None) -> PointRecord:
        """A record from its JSON form; ``dtype`` fills in a schema-1 record that lacks it."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        known = {k: v for k, v in data.items() if k in names}
        extra = {k: v for k, v in data.items() if k not in names}
        extra.update(data.get("extra") or {})
        known.setdefault("schema_version", 1)
        record = cls(**known, extra=extra)
        if record.dtype is None and dtype is not None:
            record.dtype = dtype
        if record.dtype is not None:
            if record.dtype not in EPS:
                raise ValueError(f"unknown dtype {record.dtype!r} (expected {sorted(EPS)})")
            if record.eps is None:
                record.eps = EPS[record.dtype]
        return record

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        extra = out.pop("extra")
        out.update(extra)
        return out

    @property
    def measured(self) -> bool:
        return bool(self.success) and finite(self.entropy_change)


def as_records(records: Iterable[PointRecord | Mapping[str, Any]], dtype: str | None = None):
    """PointRecords sorted by (η, repeat), from records or their JSON dicts."""
    out = [
        r if isinstance(r, PointRecord) else PointRecord.from_dict(r, dtype=dtype) for r in records
    ]
    return sorted(out, key=lambda r: (float(r.learning_rate), int(r.repeat)))
