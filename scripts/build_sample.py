#!/usr/bin/env python
"""Rebuild ``dgl_crystalframer/sample/megnet_sample.json.gz`` (and its README) byte for byte.

Inputs are two files from PyPI, fetched with pip (or taken from ``--cache DIR``):

* ``matminer-0.3.9.tar.gz`` (the sdist): ``matminer/datasets/{flla_2015,elastic_tensor,
  dielectric_constant,piezoelectric_tensor}.csv`` -- real Materials Project structures.
* ``jarvis_leaderboard-2024.10.30-py2.py3-none-any.whl``:
  ``jarvis_leaderboard/benchmarks/AI/SinglePropertyPrediction/megnet_{e_form,gappbe}.json.zip``
  -- the MP 2018.6.1 ("megnet") formation energies and PBE gaps with their official
  JARVIS-Leaderboard train/val/test membership.

Everything is read from inside the archives (nothing is extracted).  Structures are parsed
by hand (pymatgen dict strings for flla_2015, POSCAR strings for the other three), so the
output does not depend on the installed pymatgen.  Output is deterministic: entries sorted by
id, coordinates and lattices rounded to 1e-6, ``json.dumps(sort_keys=True,
separators=(",", ":"))``, gzip with ``mtime=0``, a fixed member name and level 9.

    python scripts/build_sample.py                 # download to a temp dir, rebuild in place
    python scripts/build_sample.py --cache DIR     # reuse / keep the downloads in DIR
    python scripts/build_sample.py --check         # rebuild to memory, compare sha256, exit 1 on mismatch

The JSON payload is identical on every platform; the gzip bytes are identical as long as the
zlib library is (the README records the zlib version it was built with).
"""
from __future__ import annotations

import argparse
import ast
import csv
import gzip
import hashlib
import io
import json
import math
import os
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections import OrderedDict

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SAMPLE_DIR = os.path.join(REPO, "dgl_crystalframer", "sample")
OUT_NAME = "megnet_sample.json.gz"
MEMBER_NAME = "megnet_sample.json"
FORMAT = "dgl_crystalframer.megnet_sample/1"

MATMINER = {
    "package": "matminer",
    "version": "0.3.9",
    "file": "matminer-0.3.9.tar.gz",
    "sha256": "3faf9e83464f3d48f68a759bf476ad24da4c8c3e950c8f340cb917d3bb906400",
    "pip": ["download", "--no-deps", "--no-binary", ":all:", "matminer==0.3.9"],
    "licence": "modified BSD (LBNL), see LICENSE in the sdist",
}
LEADERBOARD = {
    "package": "jarvis-leaderboard",
    "version": "2024.10.30",
    "file": "jarvis_leaderboard-2024.10.30-py2.py3-none-any.whl",
    "sha256": "62cd3012987e83880583801a5ed46c0b999781505f246d91554cde6fd62d81ff",
    "pip": ["download", "--no-deps", "--only-binary", ":all:", "jarvis-leaderboard==2024.10.30"],
    "licence": "NIST software licence (LICENSE.rst in the wheel: public-domain-like NIST terms of use; the wheel's classifier says MIT)",
}
# Structure sources in priority order: when an mp-id is in several CSVs, the first one wins.
CSV_FILES = ["flla_2015.csv", "elastic_tensor.csv", "dielectric_constant.csv", "piezoelectric_tensor.csv"]
CSV_PREFIX = "matminer-0.3.9/matminer/datasets/"
LB_PREFIX = "jarvis_leaderboard/benchmarks/AI/SinglePropertyPrediction/"
LB_TASKS = OrderedDict([("e_form", "megnet_e_form"), ("gap_pbe", "megnet_gappbe")])
TARGETS = OrderedDict(
    [
        ("e_form", ("eV/atom", "formation energy per atom, MP 2018.6.1 (JARVIS-Leaderboard megnet_e_form)")),
        ("gap_pbe", ("eV", "PBE band gap, MP 2018.6.1 (JARVIS-Leaderboard megnet_gappbe)")),
        ("log10_k_vrh", ("log10(GPa)", "log10 of the Voigt-Reuss-Hill bulk modulus K_VRH (elastic_tensor.csv)")),
        ("log10_g_vrh", ("log10(GPa)", "log10 of the Voigt-Reuss-Hill shear modulus G_VRH (elastic_tensor.csv)")),
    ]
)
SPLIT_SEED = 123

csv.field_size_limit(sys.maxsize)


# ----------------------------------------------------------------------------- inputs


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch(spec: dict, cache: str) -> str:
    """Path of the archive in ``cache``, downloading it with pip when missing; sha256-checked."""
    path = os.path.join(cache, spec["file"])
    if not os.path.exists(path):
        cmd = [sys.executable, "-m", "pip", *spec["pip"], "-d", cache, "--disable-pip-version-check", "-q"]
        print("running:", " ".join(cmd), file=sys.stderr)
        subprocess.run(cmd, check=True)
    if not os.path.exists(path):
        raise SystemExit(f"pip did not produce {path}")
    digest = sha256_file(path)
    if digest != spec["sha256"]:
        raise SystemExit(f"{path}: sha256 {digest} != expected {spec['sha256']}")
    return path


def read_csvs(sdist: str) -> dict:
    """{csv name: (ref line, list of row dicts)} read straight from the sdist."""
    out = {}
    with tarfile.open(sdist, "r:gz") as tar:
        for name in CSV_FILES:
            raw = tar.extractfile(CSV_PREFIX + name).read().decode("utf-8")
            first, rest = raw.split("\n", 1)
            if not first.startswith("# ref:"):
                raise SystemExit(f"{name}: expected a '# ref:' first line, got {first[:60]!r}")
            reader = csv.reader(io.StringIO(rest))
            header = next(reader)
            rows = []
            for fields in reader:
                if len(fields) == len(header) + 1:  # an unnamed leading index column (pandas to_csv)
                    fields = fields[1:]
                if len(fields) != len(header):
                    raise SystemExit(f"{name}: row with {len(fields)} fields, header has {len(header)}")
                rows.append(dict(zip(header, fields)))
            out[name] = (first[len("# ref:"):].strip(), rows)
    return out


def read_leaderboard(wheel: str) -> dict:
    """{our target name: {split: {id: float}}} from the leaderboard json.zip files in the wheel."""
    out = {}
    with zipfile.ZipFile(wheel) as whl:
        for target, task in LB_TASKS.items():
            inner = zipfile.ZipFile(io.BytesIO(whl.read(LB_PREFIX + task + ".json.zip")))
            data = json.loads(inner.read(task + ".json"))
            out[target] = {split: {k: float(v) for k, v in data[split].items()} for split in ("train", "val", "test")}
    return out


# ----------------------------------------------------------------------------- parsing


def _r6(x: float) -> float:
    return round(float(x), 6) + 0.0  # + 0.0 turns -0.0 into 0.0


def parse_pymatgen_dict(text: str):
    d = ast.literal_eval(text)
    lattice = d["lattice"]["matrix"]
    species, coords = [], []
    for site in d["sites"]:
        sp = site["species"]
        if len(sp) == 1 and float(sp[0]["occu"]) == 1.0:
            species.append(sp[0]["element"])
        else:
            species.append({s["element"]: round(float(s["occu"]), 6) for s in sp})
        coords.append(site["abc"])
    return lattice, species, coords


def parse_poscar(text: str):
    lines = [ln for ln in text.strip("\n").split("\n")]
    scale = float(lines[1].split()[0])
    lattice = [[scale * float(v) for v in lines[i].split()[:3]] for i in (2, 3, 4)]
    elements = lines[5].split()
    counts = [int(c) for c in lines[6].split()]
    mode = lines[7].strip().lower()
    if not mode.startswith("d"):
        raise ValueError("only direct-coordinate POSCARs are expected here")
    species = [el for el, n in zip(elements, counts) for _ in range(n)]
    coords = [[float(v) for v in lines[8 + i].split()[:3]] for i in range(len(species))]
    return lattice, species, coords


def log10_positive(text: str):
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(value) or value <= 0:
        return None
    return round(math.log10(value), 10)


# ----------------------------------------------------------------------------- build


def paper_split_sizes(n: int):
    """80/10/10 as the reference code: n_train = int(0.8 n), n_val = n_test = int(0.1 n), the rest unused."""
    return int(0.8 * n), int(0.1 * n), int(0.1 * n)


def build(sdist: str, wheel: str):
    csvs = read_csvs(sdist)
    lb = read_leaderboard(wheel)
    membership = {t: {i: s for s, d in lb[t].items() for i in d} for t in lb}
    values = {t: {i: v for d in lb[t].values() for i, v in d.items()} for t in lb}

    structures, in_csvs, moduli = {}, {}, {}
    for name in CSV_FILES:
        _, rows = csvs[name]
        for row in rows:
            mid = row["material_id"]
            in_csvs.setdefault(mid, []).append(name)
            if name == "elastic_tensor.csv":
                moduli[mid] = (log10_positive(row["K_VRH"]), log10_positive(row["G_VRH"]))
            if mid in structures:
                continue
            if name == "flla_2015.csv":
                lattice, species, coords = parse_pymatgen_dict(row["structure"])
            else:
                lattice, species, coords = parse_poscar(row["poscar"])
            if len(species) != int(float(row["nsites"])):
                raise SystemExit(f"{name} {mid}: {len(species)} sites parsed, nsites says {row['nsites']}")
            structures[mid] = (name, lattice, species, coords)

    entries, dropped = [], []
    for mid in sorted(structures):
        source, lattice, species, coords = structures[mid]
        k, g = moduli.get(mid, (None, None))
        targets = {
            "e_form": values["e_form"].get(mid),
            "gap_pbe": values["gap_pbe"].get(mid),
            "log10_k_vrh": k,
            "log10_g_vrh": g,
        }
        if all(v is None for v in targets.values()):
            dropped.append(mid)
            continue
        entries.append(
            {
                "id": mid,
                "lattice": [[_r6(x) for x in row] for row in lattice],
                "species": species,
                "frac_coords": [[_r6(x) for x in c] for c in coords],
                "targets": targets,
                "split": {t: membership[t].get(mid) for t in LB_TASKS},
                "source": source,
                "in_csvs": in_csvs[mid],
            }
        )

    doc = {
        "format": FORMAT,
        "description": "Real Materials Project crystals with MP 2018.6.1 targets and official JARVIS-Leaderboard splits",
        "sources": {
            "matminer": {
                "package": MATMINER["package"],
                "version": MATMINER["version"],
                "file": MATMINER["file"],
                "sha256": MATMINER["sha256"],
                "csv_files": {name: {"path": CSV_PREFIX + name, "ref": csvs[name][0], "rows": len(csvs[name][1])} for name in CSV_FILES},
            },
            "jarvis_leaderboard": {
                "package": LEADERBOARD["package"],
                "version": LEADERBOARD["version"],
                "file": LEADERBOARD["file"],
                "sha256": LEADERBOARD["sha256"],
                "tasks": {t: LB_PREFIX + task + ".json.zip" for t, task in LB_TASKS.items()},
            },
        },
        "targets": {t: {"unit": u, "description": d} for t, (u, d) in TARGETS.items()},
        "split_targets": list(LB_TASKS),
        "n_entries": len(entries),
        "n_dropped_without_targets": len(dropped),
        "entries": entries,
    }
    return doc


def serialise(doc: dict):
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode("ascii")
    buf = io.BytesIO()
    with gzip.GzipFile(filename=MEMBER_NAME, mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
        gz.write(payload)
    return payload, buf.getvalue()


# ----------------------------------------------------------------------------- counts + README


def counts(doc: dict):
    """{target: {"total", "train", "val", "test", "protocol"}} exactly as load_dataset (splits.py) splits the sample."""
    out = OrderedDict()
    for t in TARGETS:
        ids = [e["id"] for e in doc["entries"] if e["targets"][t] is not None]
        if t in LB_TASKS:
            memb = [e["split"][t] for e in doc["entries"] if e["targets"][t] is not None]
            row = {s: sum(1 for m in memb if m == s) for s in ("train", "val", "test")}
            row["protocol"] = "JARVIS-Leaderboard membership"
        else:
            n_train, n_val, n_test = paper_split_sizes(len(ids))
            row = {"train": n_train, "val": n_val, "test": n_test, "protocol": f"paper split 80/10/10, seed {SPLIT_SEED}"}
        row["total"] = len(ids)
        out[t] = row
    return out


README_TEMPLATE = """\
# Embedded real-data sample: `megnet_sample.json.gz`

{n_entries} real Materials Project crystals with the Materials Project 2018.6.1 targets that
CrystalFramer is benchmarked on (the jarvis-tools "megnet" dataset), small enough ({size_kb} KiB)
to ship inside the package so that tests, examples and `load_dataset("megnet_sample", ...)` work
on a fresh machine without any download.  It is a sample for exercising the code on real data,
not a benchmark: the official MP numbers need the full 69,239-entry dataset.

This file and `megnet_sample.json.gz` are generated by `scripts/build_sample.py`; do not edit by hand.

## Rebuild

```bash
python scripts/build_sample.py            # pip-downloads the two archives below to a temp dir
python scripts/build_sample.py --cache DIR   # keep / reuse the downloads
python scripts/build_sample.py --check    # rebuild in memory and compare sha256 with the files here
BUILD_SAMPLE_TEST=1 pytest tests/test_sample.py   # the same check as a test (needs PyPI access)
```

The script reads only from inside the archives (nothing is extracted) and parses the
structures itself (no pymatgen), so the JSON payload is identical everywhere.  The gzip bytes
also depend on zlib; this build used zlib {zlib}.

| file | sha256 |
|---|---|
| `megnet_sample.json.gz` | `{gz_sha}` |
| JSON payload (decompressed) | `{payload_sha}` |

## Provenance

| input (from PyPI) | sha256 | licence |
|---|---|---|
| `{mm_file}` (`pip download --no-deps --no-binary :all: matminer==0.3.9`) | `{mm_sha}` | {mm_lic} |
| `{lb_file}` (`pip download --no-deps --only-binary :all: jarvis-leaderboard==2024.10.30`) | `{lb_sha}` | {lb_lic} |

Structures (first file wins when an mp-id appears in several; `source` in each entry names it):

| file in the matminer sdist | rows | how the structure is read | reference (its `# ref:` line) |
|---|---|---|---|
{csv_rows}

Targets:

| key | unit | from |
|---|---|---|
| `e_form` | eV/atom | `{lb_eform}` (values and train/val/test membership) |
| `gap_pbe` | eV | `{lb_gap}` (values and train/val/test membership) |
| `log10_k_vrh` | log10(GPa) | log10 of `K_VRH` in `elastic_tensor.csv` (non-positive moduli skipped) |
| `log10_g_vrh` | log10(GPa) | log10 of `G_VRH` in `elastic_tensor.csv` (non-positive moduli skipped) |

The JARVIS-Leaderboard has no MP bulk/shear modulus tasks (only dft_3d ones), so the two
modulus targets have no official split; `load_dataset` splits them with the paper's random
80/10/10 protocol (seed 123).  The paper's published moduli used Matformer's fixed split
instead, so they are not comparable with runs on this sample.  {n_dropped} mp-ids of the four
CSVs carry none of the four targets and are left out.

Licences: the data are Materials Project calculations, CC-BY 4.0 (cite the Materials Project
and the references above); the matminer package is distributed under a modified BSD licence
(Copyright (c) 2015, The Regents of the University of California, through LBNL); the
jarvis-leaderboard package is NIST software (its LICENSE.rst: works of NIST employees are not
subject to copyright protection in the United States, permission to use, copy, modify and
distribute is granted with the notice and disclaimer retained; its PyPI classifier says MIT).

## Counts per target and split

| target | unit | entries | train | val | test | split protocol |
|---|---|---|---|---|---|---|
{count_rows}

## Format

gzip of one JSON object (`format` = `{fmt}`), entries sorted by `id`:

```
{{"id": "mp-10", "lattice": [[...], [...], [...]],   # rows = lattice vectors, Angstrom, rounded to 1e-6
 "species": ["As", "As"],                           # per site; {{element: occupancy}} for a disordered site
 "frac_coords": [[0.25, 0.25, 0.25], ...],          # fractional, rounded to 1e-6, as given (not wrapped)
 "targets": {{"e_form": 0.107..., "gap_pbe": 0.0, "log10_k_vrh": null, "log10_g_vrh": null}},
 "split": {{"e_form": "train", "gap_pbe": "train"}},  # JARVIS-Leaderboard membership, null if not in the task
 "source": "flla_2015.csv", "in_csvs": ["flla_2015.csv"]}}
```
"""


def render_readme(doc: dict, payload: bytes, gz: bytes) -> str:
    mm = doc["sources"]["matminer"]
    how = {
        "flla_2015.csv": "`structure` column (pymatgen dict)",
        "elastic_tensor.csv": "`poscar` column",
        "dielectric_constant.csv": "`poscar` column",
        "piezoelectric_tensor.csv": "`poscar` column",
    }
    csv_rows = "\n".join(
        f"| `{info['path']}` | {info['rows']} | {how[name]} | {info['ref']} |" for name, info in mm["csv_files"].items()
    )
    count_rows = "\n".join(
        f"| `{t}` | {TARGETS[t][0]} | {c['total']} | {c['train']} | {c['val']} | {c['test']} | {c['protocol']} |"
        for t, c in counts(doc).items()
    )
    return README_TEMPLATE.format(
        n_entries=doc["n_entries"],
        size_kb=(len(gz) + 1023) // 1024,
        zlib=zlib.ZLIB_RUNTIME_VERSION,
        gz_sha=hashlib.sha256(gz).hexdigest(),
        payload_sha=hashlib.sha256(payload).hexdigest(),
        mm_file=MATMINER["file"],
        mm_sha=MATMINER["sha256"],
        mm_lic=MATMINER["licence"],
        lb_file=LEADERBOARD["file"],
        lb_sha=LEADERBOARD["sha256"],
        lb_lic=LEADERBOARD["licence"],
        csv_rows=csv_rows,
        lb_eform=LB_PREFIX + LB_TASKS["e_form"] + ".json.zip",
        lb_gap=LB_PREFIX + LB_TASKS["gap_pbe"] + ".json.zip",
        n_dropped=doc["n_dropped_without_targets"],
        count_rows=count_rows,
        fmt=FORMAT,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", help="folder for the two downloaded archives (default: a temp dir, deleted afterwards)")
    ap.add_argument("--out-dir", default=SAMPLE_DIR, help="where to write megnet_sample.json.gz and README.md")
    ap.add_argument("--check", action="store_true", help="do not write; compare with the files in --out-dir")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache or tmp
        os.makedirs(cache, exist_ok=True)
        sdist = fetch(MATMINER, cache)
        wheel = fetch(LEADERBOARD, cache)
        doc = build(sdist, wheel)
    payload, gz = serialise(doc)
    readme = render_readme(doc, payload, gz)
    gz_path = os.path.join(args.out_dir, OUT_NAME)
    readme_path = os.path.join(args.out_dir, "README.md")
    new_sha = hashlib.sha256(gz).hexdigest()
    if args.check:
        old_sha = old_payload_sha = None  # no committed file: a mismatch, not a crash
        if os.path.exists(gz_path):
            old_sha = sha256_file(gz_path)
            with gzip.open(gz_path, "rb") as fh:
                old_payload_sha = hashlib.sha256(fh.read()).hexdigest()
        new_payload_sha = hashlib.sha256(payload).hexdigest()
        print(f"gz      : committed {old_sha}  rebuilt {new_sha}")
        print(f"payload : committed {old_payload_sha}  rebuilt {new_payload_sha}")
        return 0 if (old_sha == new_sha and old_payload_sha == new_payload_sha) else 1
    os.makedirs(args.out_dir, exist_ok=True)
    with open(gz_path, "wb") as fh:
        fh.write(gz)
    with open(readme_path, "w", encoding="utf-8", newline="\n") as fh:
        fh.write(readme)
    print(f"wrote {gz_path} ({len(gz)} bytes, sha256 {new_sha}) with {doc['n_entries']} entries")
    for t, c in counts(doc).items():
        print(f"  {t:12s} {c['total']:5d}  train {c['train']:5d}  val {c['val']:4d}  test {c['test']:4d}  ({c['protocol']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
