"""The sweep's phases: one typed definition that protocol times (``PhaseCosts``), bench
totals and the memory forecast's measurements attribute by (``memory.FORECAST_PHASE``), so a
phase renamed or removed here is renamed or missing for all three, loudly."""

from __future__ import annotations

import enum

PHASE_MARK = "phase: "  # record_function prefix that ``memory.peak_allocated`` attributes by


class PhaseKind(enum.Enum):
    """What a phase is for: the measurement (a real step and E scored), the theory oracles
    along v, or the work both need (sampling, the gradient, v)."""

    SHARED = "shared"
    THEORY = "theory"
    MEASUREMENT = "measurement"


class Phase(enum.Enum):
    """The sweep's phases, the one definition PhaseCosts records under and bench reads:
    a phase renamed here is renamed for both, and one that was never recorded is an error
    (``PhaseCosts.seconds_of``), not a silent 0. ``label`` is what tables and run_meta's
    ``costs`` print (``{order}``: the jet's order)."""

    SAMPLE_E = ("sample E", PhaseKind.SHARED)
    SCORE_E = ("score E at θ₀", PhaseKind.SHARED)  # one evaluation of E: the unit
    ENTROPY_GRADIENT = ("∇H at θ₀ (rounding check)", PhaseKind.THEORY)
    SAMPLE_U = ("sample U", PhaseKind.SHARED)
    GRADIENT = ("gradient", PhaseKind.SHARED)
    UPDATE_VECTOR = ("update vector", PhaseKind.SHARED)
    JET = ("jvp to order {order}", PhaseKind.THEORY)
    IDENTITY = ("Cui identity", PhaseKind.THEORY)
    STEP_PLUS = ("step + score E at +η", PhaseKind.MEASUREMENT)
    STEP_MINUS = ("step + score E at −η", PhaseKind.MEASUREMENT)

    def __init__(self, label: str, kind: PhaseKind) -> None:
        self.label, self.kind = label, kind

    @property
    def mark(self) -> str:
        """The profiler range name of this phase (any jet order): ``phase_mark(self.mark)``."""
        return self.name


def phase_mark(name: str):
    """A profiler range naming a phase (``PhaseCosts.phase`` opens one per phase); costs
    next to nothing without an active profiler."""
    import torch

    return torch.profiler.record_function(PHASE_MARK + name)
