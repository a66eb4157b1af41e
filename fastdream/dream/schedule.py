"""Imagination horizon per update: fixed, a linear ramp (a curriculum), or a fixed imagined-step budget."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class HorizonSchedule:
    """Imagination horizon per update: fixed, a linear ramp, or a fixed imagined-step budget.

    mode ``fixed``: H = ``horizon``. ``ramp``: H goes linearly from ``h_min`` at update ``ramp_start``
    to ``h_max`` at ``ramp_end`` (MBPO's schedule shape). ``budget``: N·H = ``budget`` imagined
    steps, so N = budget // H, even beyond the posterior states at hand (the trainer then dreams from some
    states more than once, each dream with its own draws).
    """

    mode: str = "fixed"
    horizon: int = 15
    h_min: int = 1
    h_max: int = 15
    ramp_start: int = 0
    ramp_end: int = 20_000
    budget: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "ramp", "budget"):
            raise ValueError(f"horizon schedule mode must be fixed, ramp or budget, got {self.mode!r}")
        if min(self.horizon, self.h_min, self.h_max) < 1 or self.h_min > self.h_max:
            raise ValueError(f"horizons must be >= 1 with h_min <= h_max, got {self}")
        if self.mode == "budget" and self.budget < self.horizon:
            raise ValueError(f"budget {self.budget} must be >= horizon {self.horizon}")

    def horizon_at(self, update: int) -> int:
        """H for ``update`` (0-based)."""
        if self.mode != "ramp":
            return self.horizon
        if update <= self.ramp_start:
            return self.h_min
        if update >= self.ramp_end:
            return self.h_max
        frac = (update - self.ramp_start) / (self.ramp_end - self.ramp_start)
        return int(round(self.h_min + frac * (self.h_max - self.h_min)))

    def starts_at(self, update: int, available: int, requested: int = 0) -> int:
        """Number of dreams N for ``update`` out of ``available`` posterior states."""
        if self.mode == "budget":
            return max(1, self.budget // self.horizon_at(update))
        return available if requested <= 0 else requested
