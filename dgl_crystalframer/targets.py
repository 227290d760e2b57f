"""Target values: how raw values are read, and the normalisation the model is trained in (which
targets each named dataset provides, with aliases and units: ``datasets.py``).

Plain Python and NumPy; the command line and ``config.py`` use it without loading torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np


def to_float(value: Any) -> Optional[float]:
    """Finite float or None for NaN / inf / "na" / "" / None / non-numeric."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
    else:
        s = str(value).strip()
        if s.lower() in ("", "na", "nan", "n/a", "none", "null", "inf", "-inf", "+inf"):
            return None
        try:
            v = float(s)
        except ValueError:
            return None
    return v if math.isfinite(v) else None


@dataclass(frozen=True)
class Normalizer:
    """Targets are standardised with the training set's mean and population standard deviation
    (docs/METHOD.md 5); the model predicts in those units and ``decode`` maps back."""

    mean: float
    std: float

    @classmethod
    def fit(cls, values) -> "Normalizer":
        y = np.asarray(values, dtype=np.float64)
        std = float(y.std())  # population std (ddof=0)
        return cls(float(y.mean()), std if math.isfinite(std) and std > 0 else 1.0)

    @classmethod
    def from_dict(cls, d: Dict[str, float]) -> "Normalizer":
        return cls(float(d["mean"]), float(d["std"]))

    def as_dict(self) -> Dict[str, float]:
        return {"mean": self.mean, "std": self.std}

    def encode(self, y):
        return (y - self.mean) / self.std

    def decode(self, prediction):
        return prediction * self.std + self.mean


__all__ = ["Normalizer", "to_float"]
