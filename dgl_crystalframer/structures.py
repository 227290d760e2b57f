"""Crystal structures in every supported input format -> ``CrystalArrays`` (plain, validated
NumPy arrays): the only place where structures are parsed.

Inputs: a pymatgen ``Structure`` (disordered sites allowed), an ASE ``Atoms``, a jarvis-tools
``Atoms`` or its dict, a structure file (CIF, POSCAR, pymatgen's other formats), CIF/POSCAR text,
or a JSON record holding one of these.  Anything unusable raises ``StructureError``: one line that
names the entry and the problem.
"""
from __future__ import annotations

import os
import re
import sys
import warnings
from dataclasses import dataclass
from typing import Any, Dict, Optional

import numpy as np

from .errors import StructureError

NUM_SPECIES = 98  # Z = 1..98, column Z-1 of the one-hot
MIN_DISTANCE = 0.1  # Angstrom: closer atoms (or images) are treated as a broken structure
MIN_VOLUME = 1e-3  # Angstrom^3: |det L| below this is a degenerate lattice

# Element symbols for Z = 1..98 (index Z-1); a table so jarvis/ASE input needs no pymatgen.
_SYMBOLS = (
    "H He Li Be B C N O F Ne Na Mg Al Si P S Cl Ar K Ca Sc Ti V Cr Mn Fe Co Ni Cu Zn Ga Ge As Se "
    "Br Kr Rb Sr Y Zr Nb Mo Tc Ru Rh Pd Ag Cd In Sn Sb Te I Xe Cs Ba La Ce Pr Nd Pm Sm Eu Gd Tb "
    "Dy Ho Er Tm Yb Lu Hf Ta W Re Os Ir Pt Au Hg Tl Pb Bi Po At Rn Fr Ra Ac Th Pa U Np Pu Am Cm "
    "Bk Cf"
).split()
_Z_OF_SYMBOL = {s: z for z, s in enumerate(_SYMBOLS, start=1)}
assert len(_SYMBOLS) == NUM_SPECIES


def element_symbol(z: int) -> str:
    """The element symbol of atomic number ``z`` (1..98)."""
    return _SYMBOLS[int(z) - 1]


@dataclass
class CrystalArrays:
    """A crystal as plain arrays (float64 unless noted).

    lattice: [3, 3], rows are lattice vectors (Angstrom)
    cart:    [N, 3], Cartesian positions (Angstrom), as given (not wrapped)
    species: [N, 98], occupancy weights, column Z-1 (rows sum to the site occupancy, <= 1)
    Z:       [N] int64, atomic number of the majority species of each site
    name:    label used in error messages (entry id, file path, or None for "structure")
    """

    lattice: np.ndarray
    cart: np.ndarray
    species: np.ndarray
    Z: np.ndarray
    name: Optional[str] = None

    @property
    def num_atoms(self) -> int:
        return int(self.cart.shape[0])


def structure_to_arrays(structure: Any, entry_id: Optional[str] = None) -> CrystalArrays:
    """Convert any supported structure type to validated ``CrystalArrays``.

    Accepts a pymatgen ``Structure`` (disordered sites allowed), an ASE ``Atoms`` (periodic in
    all three directions), a jarvis-tools ``Atoms`` or its ``to_dict()`` dict, or a str/Path to
    a structure file (``read_structure_file``).  Raises ``StructureError``.
    """
    if isinstance(structure, CrystalArrays):
        name = entry_id or structure.name
        arrays = CrystalArrays(structure.lattice, structure.cart, structure.species, structure.Z, name)
    elif isinstance(structure, (str, os.PathLike)):
        arrays = read_structure_file(structure, entry_id)
    elif _is_instance(structure, "pymatgen.core.structure", "IStructure"):
        arrays = _from_pymatgen(structure, entry_id)
    elif _is_instance(structure, "ase.atoms", "Atoms"):
        arrays = _from_ase(structure, entry_id)
    elif isinstance(structure, dict) or _is_instance(structure, "jarvis.core.atoms", "Atoms"):
        arrays = _from_jarvis(structure, entry_id)
    else:
        raise StructureError(
            f"{entry_label(entry_id)}: unsupported structure type {type(structure).__name__} (expected a pymatgen "
            "Structure, ASE Atoms, jarvis Atoms or dict, or a CIF/POSCAR path)"
        )
    validate_arrays(arrays)
    return arrays


def _is_instance(obj: Any, module: str, cls: str) -> bool:
    # If the module was never imported, obj cannot be an instance of its class: no import needed.
    mod = sys.modules.get(module)
    return mod is not None and isinstance(obj, getattr(mod, cls))


def entry_label(name: Optional[str]) -> str:
    """How error messages name an entry: its id or path, else "structure"."""
    return str(name) if name else "structure"


def read_structure_file(path: str, entry_id: Optional[str] = None) -> CrystalArrays:
    """A structure file -> validated ``CrystalArrays``.  CIF (.cif/.mcif), POSCAR (.vasp/.poscar,
    POSCAR*/CONTCAR*), pymatgen's other formats by extension (.json, .xsf, .cssr, ...), and files
    without a known extension by their content (CIF if it has a data_ block, else POSCAR)."""
    path = os.fspath(path)
    name = entry_id or path
    if not os.path.isfile(path):
        raise StructureError(f"{name}: no such file {path!r}")
    low, base = path.lower(), os.path.basename(path.lower())
    if low.endswith((".cif", ".mcif")):
        fmt = "cif"
    elif low.endswith((".vasp", ".poscar")) or base.startswith(("poscar", "contcar")):
        fmt = "poscar"
    elif os.path.splitext(base)[1] in ("", ".txt", ".dat"):
        fmt = None  # decided by the content below
    else:
        return _validated(_from_pymatgen(_pymatgen_call(lambda S: S.from_file(path), name, f"from {path!r}"), name))
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as fh:
            text = fh.read()
    except OSError as exc:
        raise StructureError(f"{name}: cannot read {path!r} ({exc})") from exc
    return parse_structure_text(text, name, fmt, what=f"from {path!r}")


def parse_structure_text(text: str, entry_id: Optional[str] = None, fmt: Optional[str] = None,
                         what: str = "text") -> CrystalArrays:
    """CIF or POSCAR text -> validated ``CrystalArrays`` (format guessed when ``fmt`` is None)."""
    if fmt is None:
        fmt = "cif" if (re.search(r"^\s*data_", text, re.M) or "_cell_length_a" in text) else "poscar"
    try:
        structure = _pymatgen_call(lambda S: S.from_str(text, fmt=fmt), entry_label(entry_id), f"{what} ({fmt.upper()})")
    except StructureError:
        overlapping = _cif_with_overlapping_atoms(text, entry_id) if fmt == "cif" else None
        if overlapping is None:
            raise
        return _validated(overlapping)  # the graph's overlap check names the atoms
    return _validated(_from_pymatgen(structure, entry_id))


def _cif_with_overlapping_atoms(text: str, entry_id: Optional[str]) -> Optional[CrystalArrays]:
    """A CIF that pymatgen rejects because two of its atoms sit on one site, read one atom per
    site (its symmetry operations applied); None if it has no such atoms or cannot be read so.

    pymatgen merges atoms closer than its site tolerance, sums their occupancies and then drops
    the structure ("Invalid CIF file with no structures!"), which hides the actual problem."""
    try:
        from pymatgen.io.cif import CifFile, CifParser

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parser = CifParser.from_str(text)
            block = next(iter(CifFile.from_str(text).data.values()))
            lattice = parser.get_lattice(block)
            ops = parser.get_symops(block)
        number = lambda v: float(re.sub(r"\(\d*\)$", "", str(v)))  # noqa: E731  "0.25(3)" -> 0.25
        labels = block["_atom_site_label"] if "_atom_site_label" in block.data else block["_atom_site_type_symbol"]
        symbols = block["_atom_site_type_symbol"] if "_atom_site_type_symbol" in block.data else labels
        fracs, z = [], []
        for k, symbol in enumerate(symbols):
            site = np.array([number(block[f"_atom_site_fract_{c}"][k]) for c in "xyz"])
            element = re.match(r"[A-Z][a-z]?", str(symbol).strip())
            images: list = []
            for op in ops:  # the symmetry images of this atom, each once
                f = np.mod(op.operate(site), 1.0)
                if not any(np.allclose(d - np.rint(d), 0, atol=1e-4) for d in (f - g for g in images)):
                    images.append(f)
            fracs += images
            z += [_Z_OF_SYMBOL.get(element.group(0) if element else "", 0)] * len(images)
    except Exception:  # not a CIF this reading understands: pymatgen's own error stands
        return None
    if lattice is None or not fracs or 0 in z:
        return None
    matrix = np.array(lattice.matrix, dtype=np.float64)
    cart = np.array(fracs) @ matrix
    frac = np.array(fracs)
    for i in range(len(frac)):  # any two atoms within MIN_DISTANCE of each other (nearest image)?
        d = frac[i + 1:] - frac[i]
        d = (d - np.rint(d)) @ matrix
        if len(d) and float(np.min(np.einsum("ij,ij->i", d, d))) < MIN_DISTANCE ** 2:
            return _one_hot_arrays(matrix, cart, np.array(z, dtype=np.int64), entry_id)
    return None


def _validated(arrays: CrystalArrays) -> CrystalArrays:
    validate_arrays(arrays)
    return arrays


def structure_from_record(record: Dict[str, Any], entry_id: str) -> Any:
    """The structure in a JSON record: a jarvis ``atoms`` dict, CIF/POSCAR text under ``atoms`` or
    ``structure``, or a pymatgen structure dict; returns what ``structure_to_arrays`` accepts."""
    if record.get("atoms") is not None:
        atoms = record["atoms"]
        return parse_structure_text(atoms, entry_id) if isinstance(atoms, str) else atoms
    s = record.get("structure")
    if isinstance(s, str):
        return parse_structure_text(s, entry_id)
    if isinstance(s, dict):
        return s if "lattice_mat" in s else _pymatgen_call(lambda S: S.from_dict(s), entry_id, "from its pymatgen dict")
    raise StructureError(f"{entry_id}: record has no 'atoms' (jarvis dict) or 'structure' (CIF/POSCAR text or pymatgen dict)")


def _pymatgen_call(fn, name: str, what: str):
    """Run a pymatgen Structure reader; any failure becomes one StructureError naming the entry."""
    from pymatgen.core import Structure

    try:
        with warnings.catch_warnings():  # pymatgen's notes (e.g. coordinates rounded) would flood stderr
            warnings.simplefilter("ignore")
            return fn(Structure)
    except Exception as exc:  # pymatgen raises many kinds (ValueError, IndexError, CifParserError...)
        raise StructureError(f"{name}: cannot read a crystal structure {what} ({type(exc).__name__}: {exc})") from exc


def _from_pymatgen(structure: Any, entry_id: Optional[str]) -> CrystalArrays:
    name = entry_label(entry_id)
    pbc = getattr(structure.lattice, "pbc", (True, True, True))
    if not all(pbc):
        raise StructureError(f"{name}: structure is not periodic in all three directions (pbc={tuple(pbc)})")
    lattice = np.array(structure.lattice.matrix, dtype=np.float64)
    cart = np.array(structure.cart_coords, dtype=np.float64).reshape(-1, 3)
    species = np.zeros((len(structure), NUM_SPECIES))
    for i, site in enumerate(structure):  # per-site Python loop: cheap next to the search
        for sp, occ in site.species.items():
            z = getattr(sp, "Z", 0)
            if not (isinstance(z, (int, np.integer)) and 1 <= z <= NUM_SPECIES):
                raise StructureError(f"{name}: site {i} has species {sp} (need an element with Z in 1..{NUM_SPECIES})")
            species[i, z - 1] += float(occ)
    return CrystalArrays(lattice, cart, species, _majority_z(species), entry_id)


def _from_ase(atoms: Any, entry_id: Optional[str]) -> CrystalArrays:
    name = entry_label(entry_id)
    if not np.all(atoms.pbc):
        raise StructureError(f"{name}: ASE Atoms is not periodic in all three directions (pbc={tuple(atoms.pbc)})")
    z = np.asarray(atoms.numbers, dtype=np.int64)
    return _one_hot_arrays(np.array(atoms.cell.array, dtype=np.float64), np.array(atoms.positions, dtype=np.float64), z, entry_id)


def _from_jarvis(obj: Any, entry_id: Optional[str]) -> CrystalArrays:
    name = entry_label(entry_id)
    get = obj.get if isinstance(obj, dict) else (lambda key, default=None: getattr(obj, key, default))
    try:
        lattice = np.array(get("lattice_mat"), dtype=np.float64).reshape(3, 3)
        coords = np.array(get("coords"), dtype=np.float64).reshape(-1, 3)
        elements = list(get("elements"))
    except Exception as exc:
        raise StructureError(f"{name}: not a jarvis Atoms dict with lattice_mat, coords, elements ({exc})") from exc
    if len(elements) != len(coords):
        raise StructureError(f"{name}: {len(elements)} elements but {len(coords)} coordinates")
    z = np.array([_Z_OF_SYMBOL.get(str(e).strip(), 0) for e in elements], dtype=np.int64)
    if np.any(z == 0):
        bad = elements[int(np.argmax(z == 0))]
        raise StructureError(f"{name}: unknown element {bad!r} (need an element with Z in 1..{NUM_SPECIES})")
    cartesian = bool(get("cartesian", False))
    cart = coords if cartesian else coords @ lattice
    return _one_hot_arrays(lattice, cart, z, entry_id)


def _one_hot_arrays(lattice: np.ndarray, cart: np.ndarray, z: np.ndarray, entry_id: Optional[str]) -> CrystalArrays:
    bad = (z < 1) | (z > NUM_SPECIES)
    if np.any(bad):
        k = int(np.argmax(bad))
        raise StructureError(f"{entry_label(entry_id)}: atom {k} has Z = {int(z[k])} (need Z in 1..{NUM_SPECIES})")
    species = np.zeros((len(z), NUM_SPECIES))
    species[np.arange(len(z)), z - 1] = 1.0
    return CrystalArrays(lattice, cart.reshape(-1, 3), species, z, entry_id)


def _majority_z(species: np.ndarray) -> np.ndarray:
    # argmax picks the lowest Z on ties: deterministic
    return (np.argmax(species, axis=1) + 1).astype(np.int64) if len(species) else np.zeros(0, dtype=np.int64)


def validate_arrays(arrays: CrystalArrays) -> None:
    """Shape, finiteness, species and lattice checks (cheap; overlaps are checked during the search)."""
    name = entry_label(arrays.name)
    lattice, cart, species = arrays.lattice, arrays.cart, arrays.species
    if np.shape(lattice) != (3, 3):
        raise StructureError(f"{name}: lattice must be 3x3, got shape {np.shape(lattice)}")
    if cart.ndim != 2 or cart.shape[1] != 3 or cart.shape[0] == 0:
        raise StructureError(f"{name}: structure has no atoms" if cart.size == 0 else f"{name}: positions must be [N, 3], got {cart.shape}")
    n = cart.shape[0]
    if species.shape != (n, NUM_SPECIES) or np.shape(arrays.Z) != (n,):
        raise StructureError(f"{name}: species must be [{n}, {NUM_SPECIES}] and Z [{n}], got {species.shape} and {np.shape(arrays.Z)}")
    if not np.all(np.isfinite(lattice)):
        raise StructureError(f"{name}: lattice has non-finite entries")
    if not np.all(np.isfinite(cart)):
        raise StructureError(f"{name}: atom {int(np.argmax(~np.isfinite(cart).all(axis=1)))} has non-finite coordinates")
    if not np.all(np.isfinite(species)) or np.any(species < 0) or np.any(species.sum(axis=1) <= 0):
        raise StructureError(f"{name}: species occupancies must be finite, >= 0 and not all zero on a site")
    z = np.asarray(arrays.Z)
    if np.any((z < 1) | (z > NUM_SPECIES)):
        raise StructureError(f"{name}: atomic numbers must be in 1..{NUM_SPECIES}, got {int(z.min())}..{int(z.max())}")
    volume = abs(float(np.linalg.det(lattice)))
    if not volume >= MIN_VOLUME:
        raise StructureError(f"{name}: degenerate lattice (|det| = {volume:.3g} A^3 < {MIN_VOLUME:g})")


__all__ = ["CrystalArrays", "MIN_DISTANCE", "element_symbol", "MIN_VOLUME", "NUM_SPECIES", "StructureError", "parse_structure_text",
           "read_structure_file", "structure_from_record", "structure_to_arrays", "validate_arrays"]
