"""The training domain: what a checkpoint records about the crystals its model was trained on, and
the check of a new crystal against that record (``predict`` flags the crystals outside it).

A model answers for any graph, also for elements it never saw in training (their embedding rows
never moved from their random start) and for a crystal whose atoms have no neighbours within the
cutoff (one atom in a 100 A cell: its graph is the self edge only).  Such numbers look as
confident as any other.  The record, from the training graphs: the elements present, the range of
atoms per cell and the range of edges per atom (in-degree: the images within the cutoff, self
image included; an isolated atom has 1).

    record = domain_of(train_graphs)        # graphs or stored GraphRefs; checkpoint meta["domain"]
    why = outside(record, graph)            # "" inside, else the reasons in words
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, List, Optional

from .graph_store import summary
from .structures import element_symbol

DOMAIN_KEYS = ("elements", "atoms_per_cell", "edges_per_atom")


def domain_of(graphs: Iterable[Any]) -> Dict[str, Any]:
    """The record of a set of training graphs, or of their ``GraphRef``s in the cache (read without
    building the graphs), in plain JSON types."""
    elements: set = set()
    atoms: List[int] = []
    degree_lo, degree_hi = None, None
    for g in graphs:
        present, n, lo, hi = summary(g)
        elements.update(present)
        atoms.append(n)
        degree_lo = lo if degree_lo is None else min(degree_lo, lo)
        degree_hi = hi if degree_hi is None else max(degree_hi, hi)
    if not atoms:
        return {}
    return {"elements": [element_symbol(z) for z in sorted(elements)], "atoms_per_cell": [min(atoms), max(atoms)],
            "edges_per_atom": [degree_lo, degree_hi], "n_crystals": len(atoms)}


def outside(record: Optional[Dict[str, Any]], graph: Any) -> Optional[str]:
    """Why ``graph`` lies outside the training domain ``record`` ("" when it does not); None when
    there is no record (a checkpoint from an older version, or a converted one)."""
    if not record or any(k not in record for k in DOMAIN_KEYS):
        return None
    reasons = []
    present, n, deg_lo, deg_hi = summary(graph)
    unseen = [element_symbol(z) for z in sorted(present) if element_symbol(z) not in set(record["elements"])]
    if unseen:
        reasons.append(f"element{'s' if len(unseen) > 1 else ''} {', '.join(unseen)} not in training")
    lo, hi = record["atoms_per_cell"]
    if not lo <= n <= hi:
        reasons.append(f"{n} atoms per cell (training {lo}-{hi})")
    dlo, dhi = record["edges_per_atom"]
    worst = deg_lo if deg_lo < dlo else deg_hi if deg_hi > dhi else None
    if worst is not None:
        reasons.append(f"an atom with {worst} edge{'s' if worst != 1 else ''} (training {dlo}-{dhi} per atom)")
    return "; ".join(reasons)


def outside_any(records: Iterable[Optional[Dict[str, Any]]], graph: Any) -> Optional[str]:
    """``outside`` against several records (an ensemble): the reasons of every member that has a
    record, each once; None when no member has one."""
    found = [outside(r, graph) for r in records]
    known = [f for f in found if f is not None]
    if not known:
        return None
    reasons: List[str] = []
    for f in known:
        for part in filter(None, f.split("; ")):
            if part not in reasons:
                reasons.append(part)
    return "; ".join(reasons)


__all__ = ["DOMAIN_KEYS", "domain_of", "outside", "outside_any"]
