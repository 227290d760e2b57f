"""targets.py: target aliases and units (and the error for an unknown source)."""
import pytest

from dgl_crystalframer.data import load_dataset
from dgl_crystalframer.targets import TARGET_UNITS, resolve_target


def test_unknown_source_and_aliases():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("no_such_dataset_or_file", "x")
    assert resolve_target("dft_3d_2021", "e_form") == "formation_energy_peratom"
    assert resolve_target("megnet", "gap_pbe") == "gap pbe"
    assert resolve_target("megnet_sample", "shear") == "log10_g_vrh"
    assert TARGET_UNITS["dft_3d_2021"]["ehull"] == "eV"
