"""Targets: the properties each named dataset provides, their aliases and units, how raw values
are read, and the normalisation the model is trained in.

Plain Python and NumPy; the command line and ``config.py`` use it without loading torch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .errors import DataError

@dataclass(frozen=True)
class TargetInfo:
    key: str  # the key in the source's records
    unit: str
    description: str
    aliases: Tuple[str, ...] = ()
    joint: Tuple[str, ...] = ()  # filtered together with these keys (shared split), docs/METHOD.md 6
    leaderboard_task: Optional[str] = None  # jarvis_leaderboard .../SinglePropertyPrediction/<task>.json.zip


_DFT3D_JOINT = ("formation_energy_peratom", "optb88vdw_total_energy", "optb88vdw_bandgap")
_MEGNET_JOINT = ("e_form", "gap pbe")

TARGETS: Dict[str, Dict[str, TargetInfo]] = {
    "megnet_sample": {
        "e_form": TargetInfo("e_form", "eV/atom", "formation energy per atom (MP 2018.6.1)", ("formation_energy", "formation_energy_per_atom", "eform")),
        "gap_pbe": TargetInfo("gap_pbe", "eV", "PBE band gap (MP 2018.6.1)", ("gap pbe", "gap", "bandgap", "band_gap")),
        "log10_k_vrh": TargetInfo("log10_k_vrh", "log10(GPa)", "log10 bulk modulus K_VRH", ("bulk", "bulk modulus", "bulk_modulus", "k_vrh")),
        "log10_g_vrh": TargetInfo("log10_g_vrh", "log10(GPa)", "log10 shear modulus G_VRH", ("shear", "shear modulus", "shear_modulus", "g_vrh")),
    },
    "dft_3d_2021": {
        "formation_energy_peratom": TargetInfo(
            "formation_energy_peratom", "eV/atom", "formation energy per atom (OptB88vdW)",
            ("e_form", "eform", "formation_energy"), _DFT3D_JOINT, "dft_3d_formation_energy_peratom"),
        "optb88vdw_total_energy": TargetInfo(
            "optb88vdw_total_energy", "eV/atom", "total energy per atom (OptB88vdW)",
            ("e_total", "total_energy"), _DFT3D_JOINT, "dft_3d_optb88vdw_total_energy"),
        "optb88vdw_bandgap": TargetInfo(
            "optb88vdw_bandgap", "eV", "band gap (OptB88vdW)",
            ("bandgap", "opt_bandgap", "bg_opt", "gap"), _DFT3D_JOINT, "dft_3d_optb88vdw_bandgap"),
        "mbj_bandgap": TargetInfo("mbj_bandgap", "eV", "band gap (TBmBJ)", ("mbj", "bg_mbj"), (), "dft_3d_mbj_bandgap"),
        "ehull": TargetInfo("ehull", "eV", "energy above the convex hull", ("e_hull",), (), "dft_3d_ehull"),
    },
    "megnet": {
        "e_form": TargetInfo("e_form", "eV/atom", "formation energy per atom (MP 2018.6.1)",
                             ("formation_energy", "formation_energy_per_atom", "eform"), _MEGNET_JOINT, "megnet_e_form"),
        "gap pbe": TargetInfo("gap pbe", "eV", "PBE band gap (MP 2018.6.1)",
                              ("gap_pbe", "gap", "bandgap", "band_gap"), _MEGNET_JOINT, "megnet_gappbe"),
        "bulk modulus": TargetInfo("bulk modulus", "log10(GPa)", "log10 bulk modulus K_VRH",
                                   ("bulk", "bulk_modulus", "log10_k_vrh", "k_vrh")),
        "shear modulus": TargetInfo("shear modulus", "log10(GPa)", "log10 shear modulus G_VRH",
                                    ("shear", "shear_modulus", "log10_g_vrh", "g_vrh")),
    },
}
TARGET_ALIASES: Dict[str, Dict[str, str]] = {
    src: {alias: key for key, t in tgts.items() for alias in (key, *t.aliases)} for src, tgts in TARGETS.items()
}
TARGET_UNITS: Dict[str, Dict[str, str]] = {src: {key: t.unit for key, t in tgts.items()} for src, tgts in TARGETS.items()}

def resolve_target(source: str, target: str) -> str:
    """The record key of ``target`` (an alias or the key itself) for a named source."""
    table = TARGET_ALIASES.get(source)
    if table is None:
        return target
    if target in table:
        return table[target]
    norm = str(target).strip().lower().replace("-", "_")
    for alias, key in table.items():
        if alias.lower().replace("-", "_") == norm or alias.lower().replace(" ", "_") == norm:
            return key
    raise DataError(f"unknown target {target!r} for {source!r}; known: {', '.join(TARGETS[source])} "
                     f"(aliases: {', '.join(sorted(a for a in table if a not in TARGETS[source]))})")


def default_target(dataset: str) -> Optional[str]:
    """The usual target of a named dataset (its formation energy); None for a user's data."""
    return DEFAULT_TARGETS.get(dataset)


DEFAULT_TARGETS = {"megnet_sample": "e_form", "megnet": "e_form", "dft_3d_2021": "formation_energy_peratom"}


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


__all__ = ["DEFAULT_TARGETS", "Normalizer", "TARGETS", "TARGET_ALIASES", "TARGET_UNITS", "TargetInfo", "default_target",
           "resolve_target", "to_float"]
