"""Confidence intervals for rates measured on few events (wrong reuse, audits, learned reuse thresholds)."""

from __future__ import annotations

import numpy as np


def wilson_interval(k: int, n: int, z: float = 1.96) -> list[float] | None:
    """Wilson score interval of a proportion k/n (None for n = 0): sound at small n and at 0 or n successes,
    where the normal approximation gives a zero-width interval."""
    if n <= 0:
        return None
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]
