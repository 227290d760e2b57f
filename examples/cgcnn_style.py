"""Drop CrystalFramerConv into someone else's DGL crystal model.

This script builds a CGCNN-style model from scratch -- its own radius graph (pymatgen neighbour
list), its own edge features and gated graph convolutions -- and then adds CrystalFramer's
frame-based periodic attention with three lines: the import, the constructor, and the call::

    from dgl_crystalframer.nn import CrystalFramerConv
    self.attn = CrystalFramerConv(dim, num_heads=4, frame="max")
    h = h + self.attn(g, h, rvec=-g.edata["r"])

The graph follows CGCNN habits rather than dgl_crystalframer's: edges point from the centre atom
to each neighbour image (src = centre i, dst = neighbour j), the displacement is stored under
edata["r"] as r = (neighbour image) - (centre), and there is no self loop.  CrystalFramerConv
aggregates DGL-style at the destination and wants, per edge, "source image minus destination";
seen from the destination j, the source i sits at -r, hence ``rvec=-g.edata["r"]``.

It then trains for a few Adam steps on small crystals of the formation-energy training split of
the sample that ships with the package, and prints the train MAE before and after.

    python examples/cgcnn_style.py --steps 30 [--device cuda]

On a GPU this example needs a CUDA build of DGL: its own CGCNN convolutions use DGL's message
passing (CrystalFramerConv alone would also run in plain PyTorch, see the README).
"""
from __future__ import annotations

import argparse
import gzip
import json
import time
from importlib import resources

# dgl_crystalframer first: it picks the OpenMP wait policy before torch loads, and imports DGL
# (with its shim for torch versions DGL ships no graphbolt library for)
from dgl_crystalframer import sparse
from dgl_crystalframer._dgl import dgl
from dgl_crystalframer.nn import CrystalFramerConv

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from pymatgen.core import Lattice, Structure  # noqa: E402
from torch import nn  # noqa: E402

fn = dgl.function


def build_radius_graph(structure: Structure, cutoff: float = 5.0, gauss_step: float = 0.2):
    """CGCNN-style radius graph: one edge centre -> neighbour image per pair within ``cutoff``.

    ndata["z"]: atomic numbers [N]; edata["r"]: neighbour image - centre [E, 3] (float32);
    edata["dist"]: Gaussian-expanded distances [E, K].  Returns None if an atom has no neighbour.
    """
    centre, nbr, image, dist = structure.get_neighbor_list(r=cutoff)  # excludes the atom itself
    if len(set(centre.tolist())) < len(structure):
        return None  # an isolated atom: nothing to convolve over
    # one canonical edge order (centre, neighbour, image): the same after rotating the crystal
    order = np.lexsort((image[:, 2], image[:, 1], image[:, 0], nbr, centre))
    centre, nbr, image, dist = centre[order], nbr[order], image[order], dist[order]
    cart, lat = structure.cart_coords, structure.lattice.matrix
    r = cart[nbr] + image @ lat - cart[centre]
    assert np.allclose(np.linalg.norm(r, axis=1), dist, atol=1e-6)
    mu = np.arange(0.0, cutoff + gauss_step, gauss_step)  # CGCNN's GaussianDistance
    gauss = np.exp(-((dist[:, None] - mu[None, :]) ** 2) / gauss_step ** 2)
    g = dgl.graph((torch.from_numpy(centre).long(), torch.from_numpy(nbr).long()), num_nodes=len(structure))
    g.ndata["z"] = torch.tensor(structure.atomic_numbers, dtype=torch.long)
    g.edata["r"] = torch.from_numpy(r).float()
    g.edata["dist"] = torch.from_numpy(gauss).float()
    return g


class CGCNNConv(nn.Module):
    """CGCNN's gated convolution: h_j += sum_e sigmoid(z_e W_f) * softplus(z_e W_s), z_e = [h_j, h_i, u_e].
    The neighbour relation is symmetric, so aggregating at the destination sees every neighbour.
    LayerNorm stands in for CGCNN's BatchNorm: a few steps leave BatchNorm's running statistics
    (used in eval mode) far from the batch statistics."""

    def __init__(self, dim: int, edge_dim: int):
        super().__init__()
        self.fc = nn.Linear(2 * dim + edge_dim, 2 * dim)
        self.norm_edge, self.norm_node = nn.LayerNorm(2 * dim), nn.LayerNorm(dim)

    def forward(self, g, h):
        with g.local_scope():
            g.ndata["h"] = h
            g.apply_edges(lambda e: {"z": self.fc(torch.cat([e.dst["h"], e.src["h"], e.data["dist"]], -1))})
            gate, core = self.norm_edge(g.edata["z"]).chunk(2, dim=-1)
            g.edata["m"] = torch.sigmoid(gate) * F.softplus(core)
            g.update_all(fn.copy_e("m", "m"), fn.sum("m", "s"))
            return F.softplus(h + self.norm_node(g.ndata["s"]))


class CGCNNWithFramer(nn.Module):
    def __init__(self, edge_dim: int, dim: int = 64, num_conv: int = 2, frame: str = "max"):
        super().__init__()
        self.embed = nn.Embedding(100, dim)
        self.convs = nn.ModuleList(CGCNNConv(dim, edge_dim) for _ in range(num_conv))
        self.attn = CrystalFramerConv(dim, num_heads=4, frame=frame)  # <- inserted layer
        self.head = nn.Linear(dim, 1)

    def node_features(self, g):
        h = self.embed(g.ndata["z"])
        for conv in self.convs:
            h = conv(g, h)
        return h

    def forward(self, g, sign: float = -1.0):
        h = self.node_features(g)
        # Our edges point centre -> neighbour, CrystalFramerConv wants source - destination: -r.
        # (``sign`` exists only so that the test can show that +r gives something else.)
        h = h + self.attn(g, h, rvec=sign * g.edata["r"])
        with g.local_scope():
            g.ndata["h"] = h
            return self.head(dgl.mean_nodes(g, "h")).squeeze(-1)


def load_crystals(num: int, max_atoms: int = 12, cutoff: float = 5.0, seed: int = 0):
    """(graphs, e_form targets in eV/atom) for ``num`` small ordered crystals of the e_form train split."""
    path = resources.files("dgl_crystalframer") / "sample" / "megnet_sample.json.gz"
    with path.open("rb") as f:
        entries = json.loads(gzip.decompress(f.read()))["entries"]
    pool = [e for e in entries if e["split"].get("e_form") == "train" and e["targets"].get("e_form") is not None
            and len(e["species"]) <= max_atoms and all(isinstance(s, str) for s in e["species"])]
    graphs, targets = [], []
    for i in np.random.default_rng(seed).permutation(len(pool)):
        e = pool[i]
        g = build_radius_graph(Structure(Lattice(e["lattice"]), e["species"], e["frac_coords"]), cutoff)
        if g is None:
            print(f"skipping {e['id']}: an atom has no neighbour within {cutoff} A")
            continue
        graphs.append(g)
        targets.append(e["targets"]["e_form"])
        if len(graphs) == num:
            break
    return graphs, torch.tensor(targets)


@torch.no_grad()
def train_mae(model, graphs, y, batch_size, mean, std, device):
    model.eval()
    pred = torch.cat([model(dgl.batch(graphs[a:a + batch_size]).to(device)).cpu()
                      for a in range(0, len(graphs), batch_size)])
    model.train()
    return (pred * std + mean - y).abs().mean().item()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--num-crystals", type=int, default=200)
    # frames computed from the displacements; "lattice" / "pca" would also need ndata["lattice"] / ["pos"]
    p.add_argument("--frame", default="max", choices=["max", "weighted_pca", "static_local", "none"])
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda[:N]")
    args = p.parse_args(argv)
    device = sparse.resolve_device(args.device)
    if not sparse.dgl_supports(device):
        raise SystemExit(f"error: this example's CGCNN convolutions use DGL's message passing, which needs a CUDA "
                         f"build of DGL on {device}; run with --device cpu")
    torch.manual_seed(args.seed)
    t0 = time.time()
    graphs, y = load_crystals(args.num_crystals, seed=args.seed)
    mean, std = y.mean(), y.std()
    print(f"{len(graphs)} crystals, {sum(g.num_edges() for g in graphs)} edges, built in {time.time() - t0:.1f} s")

    model = CGCNNWithFramer(edge_dim=graphs[0].edata["dist"].shape[1], frame=args.frame).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    initial_mae = train_mae(model, graphs, y, args.batch_size, mean, std, device)
    rng, losses, perm = np.random.default_rng(args.seed), [], []
    for step in range(1, args.steps + 1):
        if len(perm) < args.batch_size:
            perm = list(rng.permutation(len(graphs)))
        idx, perm = perm[:args.batch_size], perm[args.batch_size:]
        loss = F.mse_loss(model(dgl.batch([graphs[i] for i in idx]).to(device)), ((y[idx] - mean) / std).to(device))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        if step % 5 == 0 or step == args.steps:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({time.time() - t0:.1f} s)")
    final_mae = train_mae(model, graphs, y, args.batch_size, mean, std, device)
    baseline = (y - y.median()).abs().mean().item()
    print(f"final train MAE {final_mae:.4f} eV/atom (initial {initial_mae:.4f}, constant predictor {baseline:.4f})")
    return {"initial_loss": losses[0] if losses else None, "final_loss": losses[-1] if losses else None,
            "losses": losses, "steps": args.steps, "initial_mae": initial_mae, "final_mae": final_mae}


if __name__ == "__main__":
    main()
