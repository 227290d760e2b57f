"""The CrystalFramer model (docs/METHOD.md 4): embedding, post-residual blocks without LayerNorm
(T-Fixup initialisation), mean readout over unit-cell atoms, MLP head.  Its hyperparameters are
one ``config.ModelConfig``."""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple, Union

import torch
from torch import nn

from . import sparse as S
from .config import ModelConfig, model_config
from .frames import NODE_INPUTS
from .nn import CrystalFramerConv, edge_geometry
from .structures import NUM_SPECIES


class CrystalFramerBlock(nn.Module):
    """x = x + MHA(x);  x = x + W2 ReLU(W1 x + b1) + b2   (post-residual, no LayerNorm)."""

    def __init__(self, dim: int, num_heads: int, ffn_dim: int, dropout: float = 0.0, **conv_kwargs):
        super().__init__()
        self.attn = CrystalFramerConv(dim, num_heads, **conv_kwargs)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.ReLU(), nn.Linear(ffn_dim, dim))
        self.dropout = nn.Dropout(dropout)

    def forward(self, graph, x, geometry):
        x = x + self.dropout(self.attn(graph, x, geometry=geometry))
        return x + self.dropout(self.ffn(x))


class CrystalFramer(nn.Module):
    """CrystalFramer / Crystalformer regressor: ``model(batched_graph) -> [B]`` (one value per crystal).

    ``CrystalFramer(ModelConfig(...))``, ``CrystalFramer(num_layers=2)`` (fields of ``ModelConfig``)
    or ``CrystalFramer.from_preset("lightweight")``; ``model.config`` is the ModelConfig, and
    ``CrystalFramer(model.config)`` rebuilds the same architecture.

    The graph is what :func:`dgl_crystalframer.build_graph` returns (or a ``dgl.batch`` of them, or
    the same as a :class:`~dgl_crystalframer.batch.CrystalBatch`): ``ndata[species_key]`` [N, 98]
    occupancy-weighted one-hots, ``edata[rvec_key]`` [E, 3].  The model runs where its parameters
    are; the graph may be on the CPU (``sparse`` picks the backend for the parameters' device).
    """

    def __init__(self, config: Optional[ModelConfig] = None, **overrides: Any):
        super().__init__()
        c = model_config(**{**(config or ModelConfig()).as_dict(), **overrides})
        self.config = c
        # the sparse backend's name (dgl | torch), chosen once by whoever runs the model (trainer,
        # predictor); None: by the device of each batch (sparse.select_backend).  Not saved.
        self.sparse_backend: Optional[str] = None
        self.frame, self.num_layers, self.rvec_key, self.species_key = c.frame, c.num_layers, c.rvec_key, c.species_key
        self.num_dist_basis, self.dist_basis_rmax = c.num_dist_basis, c.dist_basis_rmax
        self.embedding = nn.Linear(NUM_SPECIES, c.dim, bias=False)
        self.blocks = nn.ModuleList(
            CrystalFramerBlock(c.dim, c.num_heads, c.ffn_dim, c.dropout, frame=c.frame, num_dist_basis=c.num_dist_basis,
                               dist_basis_rmax=c.dist_basis_rmax, num_angle_basis=c.num_angle_basis,
                               angle_basis_width=c.angle_basis_width, c_dist=c.c_dist, c_angl=c.c_angl,
                               rvec_key=c.rvec_key, symmetrize_ties=c.symmetrize_ties)
            for _ in range(c.num_layers))
        self.head = nn.Sequential(nn.Linear(c.dim, c.dim), nn.ReLU(), nn.Linear(c.dim, 1))
        self.reset_parameters()

    @classmethod
    def from_preset(cls, name: str = "default", **overrides) -> "CrystalFramer":
        """``crystalformer`` (no frames), ``default`` (max frames, D=64) or ``lightweight`` (D=16)."""
        return cls(model_config(name, **overrides))

    def reset_parameters(self):
        """T-Fixup: xavier-uniform W1, W2, Wq, Wk, Wv, Wout with zero biases, then W1, W2, Wout, Wv
        scaled by 0.67 L^-1/4; embedding ~ N(0, (d^-1/2 (9L)^-1/4)^2)."""
        L, d = self.num_layers, self.embedding.out_features
        scale = 0.67 * L ** -0.25
        for block in self.blocks:
            block.attn.reset_parameters()
            for lin in (block.ffn[0], block.ffn[2]):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
            with torch.no_grad():
                for lin in (block.ffn[0], block.ffn[2], block.attn.fc_out, block.attn.fc_v):
                    lin.weight.mul_(scale)
        nn.init.normal_(self.embedding.weight, std=d ** -0.5 * (9 * L) ** -0.25)
        for lin in (self.head[0], self.head[2]):
            lin.reset_parameters()

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _features(self, graph):
        if self.species_key not in graph.ndata:
            raise KeyError(f"graph.ndata has no {self.species_key!r} (occupancy-weighted one-hots [N, 98]); "
                           "build graphs with dgl_crystalframer.build_graph")
        weight = self.embedding.weight
        x = self.embedding(graph.ndata[self.species_key].to(weight.device, weight.dtype, non_blocking=True))
        rvec = graph.edata[self.rvec_key].to(weight.device, weight.dtype, non_blocking=True)
        geometry = edge_geometry(graph, rvec, self.num_dist_basis, self.dist_basis_rmax,  # shared by all layers
                                 backend=self.sparse_backend)
        for block in self.blocks:
            x = block(graph, x, geometry)
        return x, geometry.topo

    def input_keys(self) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
        """The graph data the model reads: (``ndata`` keys, ``edata`` keys)."""
        return (self.species_key,) + NODE_INPUTS.get(self.frame, ()), (self.rvec_key,)

    def node_features(self, graph) -> torch.Tensor:
        """Per-atom features after the last block, [N, d]."""
        return self._features(graph)[0]

    def forward(self, graph) -> torch.Tensor:
        x, topo = self._features(graph)
        pooled = S.graph_mean(topo, x)  # mean over unit-cell atoms: [B, d]
        return self.head(pooled).squeeze(-1)


def build_model(config: Union[ModelConfig, Dict[str, Any], None] = None) -> CrystalFramer:
    """The model of a ModelConfig or of its dict (as checkpoints store it)."""
    if isinstance(config, dict):
        config = model_config(**config)
    return CrystalFramer(config)


__all__ = ["CrystalFramer", "CrystalFramerBlock", "build_model"]
