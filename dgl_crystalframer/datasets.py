"""The named datasets, described rather than named: one :class:`DatasetSpec` each.

A spec says where a dataset's records come from (the embedded sample or a jarvis-tools file),
which targets it provides (keys, aliases, units, which targets share one split), its usual
target, how the paper splits it (docs/METHOD.md 6) and how long the paper trains on it
(docs/METHOD.md 5).  ``sources``, ``splits``, ``data``, ``config`` and the benchmarks ask the
spec; none of them tests a dataset's name.  Adding a dataset is one entry in ``DATASETS``.

Plain Python: the command line and ``config.py`` use it without loading torch.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

from .errors import DataError


@dataclass(frozen=True)
class TargetInfo:
    key: str  # the key in the source's records
    unit: str
    description: str
    aliases: Tuple[str, ...] = ()
    joint: Tuple[str, ...] = ()  # filtered together with these keys (shared split), docs/METHOD.md 6
    leaderboard_task: Optional[str] = None  # jarvis_leaderboard .../SinglePropertyPrediction/<task>.json.zip
    fixed_split: Optional[Tuple[int, int, int]] = None  # the reference code's fixed (train, val, test) sizes
    log10_if_gpa: bool = False  # the file may hold GPa where the paper uses log10(GPa) (jarvis "megnet" moduli)


@dataclass(frozen=True)
class JarvisFile:
    """A jarvis-tools dataset file (``jarvis.db.figshare.data(name)``)."""

    name: str  # jarvis-tools' dataset name
    url: str  # fallback when the installed jarvis-tools does not list the dataset
    member: str  # the JSON file inside the zip
    id_key: str  # the record field holding the entry's id


@dataclass(frozen=True)
class PaperEpochs:
    """The paper's epochs and batch size (docs/METHOD.md 5): ``epochs``, unless a more specific
    entry of ``by_frame`` (frame -> epochs) or ``by_frame_target`` ((frame, target) -> epochs) applies."""

    epochs: int
    batch_size: int
    by_frame: Dict[str, int] = field(default_factory=dict)
    by_frame_target: Dict[Tuple[str, str], int] = field(default_factory=dict)

    def __call__(self, target: Optional[str], frame: Optional[str]) -> Dict[str, int]:
        epochs = self.by_frame_target.get((str(frame), str(target)), self.by_frame.get(str(frame), self.epochs))
        return dict(epochs=epochs, batch_size=self.batch_size)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    title: str  # for tables and messages
    targets: Dict[str, TargetInfo]
    default_target: str
    jarvis: Optional[JarvisFile] = None  # None: the embedded sample (sources.SAMPLE_PATH)
    paper_epochs: PaperEpochs = PaperEpochs(500, 128)
    split_per_target: bool = False  # the file carries a leaderboard split per target (the embedded sample)
    train_max_atoms: Optional[int] = None  # the reference recipe leaves larger crystals out of training
    sample_of: Optional[str] = None  # a subset of that dataset: published numbers are for the full one
    full_size: str = ""  # what the published numbers train on

    def resolve_target(self, target: str) -> str:
        """The record key of ``target`` (an alias or the key itself)."""
        aliases = {alias: key for key, t in self.targets.items() for alias in (key, *t.aliases)}
        if target in aliases:
            return aliases[target]
        norm = str(target).strip().lower().replace("-", "_")
        for alias, key in aliases.items():
            if alias.lower().replace("-", "_") == norm or alias.lower().replace(" ", "_") == norm:
                return key
        raise DataError(f"unknown target {target!r} for {self.name!r}; known: {', '.join(self.targets)} "
                        f"(aliases: {', '.join(sorted(a for a in aliases if a not in self.targets))})")


_DFT3D_JOINT = ("formation_energy_peratom", "optb88vdw_total_energy", "optb88vdw_bandgap")
_MEGNET_JOINT = ("e_form", "gap pbe")
_MEGNET_FIXED = (60000, 5000, 4239)  # the reference code's fixed split of jarvis "megnet" e_form / gap
_OQMD_JOINT = ("_oqmd_delta_e", "_oqmd_stability")  # the reference reads both for one split


DATASETS: Dict[str, DatasetSpec] = {s.name: s for s in (
    DatasetSpec(
        "megnet_sample", "Materials Project 2018.6.1 (embedded sample)",
        {
            "e_form": TargetInfo("e_form", "eV/atom", "formation energy per atom (MP 2018.6.1)",
                                 ("formation_energy", "formation_energy_per_atom", "eform")),
            "gap_pbe": TargetInfo("gap_pbe", "eV", "PBE band gap (MP 2018.6.1)", ("gap pbe", "gap", "bandgap", "band_gap")),
            "log10_k_vrh": TargetInfo("log10_k_vrh", "log10(GPa)", "log10 bulk modulus K_VRH",
                                      ("bulk", "bulk modulus", "bulk_modulus", "k_vrh")),
            "log10_g_vrh": TargetInfo("log10_g_vrh", "log10(GPa)", "log10 shear modulus G_VRH",
                                      ("shear", "shear modulus", "shear_modulus", "g_vrh")),
        },
        "e_form", split_per_target=True, sample_of="megnet"),
    DatasetSpec(
        "dft_3d_2021", "JARVIS-DFT 3D 2021",
        {
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
        "formation_energy_peratom",
        jarvis=JarvisFile("dft_3d_2021", "https://ndownloader.figshare.com/files/29204826", "jdft_3d-8-18-2021.json", "jid"),
        paper_epochs=PaperEpochs(2000, 256, by_frame={"none": 800}, by_frame_target={("none", "mbj_bandgap"): 1600}),
        full_size="44,578 JARVIS-DFT crystals (dft_3d_2021, 80/10/10 split)"),
    DatasetSpec(
        "megnet", "Materials Project 2018.6.1 (megnet)",
        {
            "e_form": TargetInfo("e_form", "eV/atom", "formation energy per atom (MP 2018.6.1)",
                                 ("formation_energy", "formation_energy_per_atom", "eform"), _MEGNET_JOINT,
                                 "megnet_e_form", _MEGNET_FIXED),
            "gap pbe": TargetInfo("gap pbe", "eV", "PBE band gap (MP 2018.6.1)",
                                  ("gap_pbe", "gap", "bandgap", "band_gap"), _MEGNET_JOINT, "megnet_gappbe", _MEGNET_FIXED),
            "bulk modulus": TargetInfo("bulk modulus", "log10(GPa)", "log10 bulk modulus K_VRH",
                                       ("bulk", "bulk_modulus", "log10_k_vrh", "k_vrh"), log10_if_gpa=True),
            "shear modulus": TargetInfo("shear modulus", "log10(GPa)", "log10 shear modulus G_VRH",
                                        ("shear", "shear_modulus", "log10_g_vrh", "g_vrh"), log10_if_gpa=True),
        },
        "e_form",
        jarvis=JarvisFile("megnet", "https://ndownloader.figshare.com/files/26724977", "megnet.json", "id"),
        full_size="60,000 MP crystals (MP 2018.6.1, JARVIS-Leaderboard split)"),
    # OQMD as the official CrystalFramer code reads it: jarvis-tools' "oqmd_3d_no_cfid" (817,636
    # entries), the paper split with seed 123 (654,108 / 81,763 / 81,763; its val and test ids equal
    # the reference's published split files), 200 epochs at batch 1024, training crystals of at
    # most 320 atoms (params/crystalframer/default_oqmd.json and train_oqmd.sh of the reference).
    DatasetSpec(
        "oqmd_3d", "OQMD (jarvis-tools oqmd_3d_no_cfid)",
        {
            "_oqmd_delta_e": TargetInfo("_oqmd_delta_e", "eV/atom", "formation energy per atom (OQMD delta_e)",
                                        ("delta_e", "e_form", "formation_energy", "formation_energy_peratom"), _OQMD_JOINT),
            "_oqmd_stability": TargetInfo("_oqmd_stability", "eV/atom", "stability (OQMD: energy above the hull)",
                                          ("stability", "ehull", "e_hull"), _OQMD_JOINT),
            "_oqmd_band_gap": TargetInfo("_oqmd_band_gap", "eV", "band gap (OQMD)", ("bandgap", "band_gap", "gap")),
        },
        "_oqmd_delta_e",
        jarvis=JarvisFile("oqmd_3d_no_cfid", "https://ndownloader.figshare.com/files/26790182", "all_oqmd.json",
                          "_oqmd_entry_id"),
        paper_epochs=PaperEpochs(200, 1024), train_max_atoms=320,
        full_size="654,108 OQMD crystals (oqmd_3d_no_cfid, 80/10/10 split)"),
)}
DEFAULT_DATASET = "megnet_sample"


def dataset_spec(name: str) -> Optional[DatasetSpec]:
    """The spec of a named dataset; None for a user's file or folder."""
    return DATASETS.get(str(name))


def default_target(dataset: str) -> Optional[str]:
    """The usual target of a named dataset (its formation energy); None for a user's data."""
    spec = dataset_spec(dataset)
    return spec.default_target if spec is not None else None


__all__ = ["DATASETS", "DEFAULT_DATASET", "DatasetSpec", "JarvisFile", "PaperEpochs", "TargetInfo", "dataset_spec",
           "default_target"]
