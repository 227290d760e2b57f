"""Plain-PyTorch reference of CrystalFramer (frames ``none`` and ``max``), for ``perf``.

The same model as :class:`dgl_crystalframer.CrystalFramer`, written the straightforward way:
per-edge tensors gathered with ``x[src]`` / ``x[dst]``, segment sums with ``index_add``, the
segment softmax and the frame selection with ``scatter_reduce``, and the exact angular basis
materialised per edge, head and axis ([E, H, 3, D]).  No DGL kernel runs here; the model's own
parameters are used, so both implementations must give the same outputs (to float tolerance).
It is kept as the yardstick for the speed-up of the fused DGL kernels, not for use.
"""
from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

from .. import basis as B
from ..basis import CANDIDATE_MIN_D2, TIE_TOL
from ..frames import COLLINEAR_COS, _perpendicular
from ..lattice import normalize


def plain_inputs(bg) -> Dict[str, torch.Tensor]:
    """The batched graph as plain tensors: src, dst [E], rvec [E, 3], species [N, 98], graph id [N]."""
    src, dst = bg.edges()
    counts = bg.batch_num_nodes()
    return {"src": src, "dst": dst, "rvec": bg.edata["rvec"], "species": bg.ndata["species"],
            "graph_id": torch.repeat_interleave(torch.arange(len(counts)), counts), "num_graphs": len(counts)}


def _segment_max(values: torch.Tensor, dst: torch.Tensor, n: int, fill: float) -> torch.Tensor:
    out = values.new_full((n,) + values.shape[1:], fill)
    return out.scatter_reduce(0, dst.view(-1, *[1] * (values.dim() - 1)).expand_as(values), values, "amax")


def _segment_argmax(score, valid, dst, n, tie_breakers=()):
    """Near-best valid edges per (node, head), narrowed by the tie breakers, then the lowest
    edge index, as frames.py."""
    E = score.shape[0]
    neg = torch.finfo(score.dtype).min
    near = valid
    for values in (score, *tie_breakers):
        s = torch.where(near, values, torch.full_like(values, neg))
        best = _segment_max(s, dst, n, neg)[dst]
        near = near & (s >= best - TIE_TOL * (1.0 + best.abs()))
    index = torch.where(near, torch.arange(E).unsqueeze(-1).expand_as(s), torch.full_like(s, E, dtype=torch.long))
    first = torch.full((n, s.shape[1]), E, dtype=torch.long).scatter_reduce(0, dst.unsqueeze(-1).expand_as(index), index, "amin")
    tied = torch.zeros(n, s.shape[1]).index_add_(0, dst, near.float()) > 1.5
    return first.clamp(max=max(E - 1, 0)), first < E, tied


@torch.no_grad()
def max_frames(logits, weights, rhat, candidate, dst, n):
    H = logits.shape[1]
    valid = candidate.unsqueeze(-1).expand(-1, H)
    i1, found1, tied1 = _segment_argmax(logits, valid, dst, n)
    e1 = torch.where(found1.unsqueeze(-1), rhat[i1], rhat.new_tensor([1.0, 0.0, 0.0]).expand(n, H, 3))
    cos1 = (rhat.unsqueeze(1) * e1[dst]).sum(-1)
    valid2 = valid & (cos1.abs() < COLLINEAR_COS)
    mean_dir = torch.zeros(n, H, 3).index_add_(0, dst, (weights * candidate.unsqueeze(-1)).unsqueeze(-1) * rhat.unsqueeze(1))
    turn = (torch.cross(e1[dst], rhat.unsqueeze(1).expand(-1, H, -1), dim=-1) * mean_dir[dst]).sum(-1)
    i2, found2, tied2 = _segment_argmax(logits + torch.log((1.0 - cos1.abs()).clamp_min(1e-5)), valid2, dst, n, (turn,))
    r2 = rhat[i2]
    e2 = torch.where(found2.unsqueeze(-1), normalize(r2 - (r2 * e1).sum(-1, keepdim=True) * e1), _perpendicular(e1))
    return torch.stack([e1, e2, torch.cross(e1, e2, dim=-1)], dim=2), tied1 | (tied2 & found2)


def attention_layer(conv, x: torch.Tensor, g: Dict[str, torch.Tensor]) -> torch.Tensor:
    """One CrystalFramerConv (frame none or max) with plain torch ops."""
    if conv.frame not in ("none", "max"):
        raise NotImplementedError(f"the reference implements frames none and max, not {conv.frame!r}")
    src, dst, rvec = g["src"], g["dst"], g["rvec"].to(x.dtype)
    N, H, dh = x.shape[0], conv.num_heads, conv.head_dim
    q, k, v = (lin(x).view(N, H, dh) for lin in (conv.fc_q, conv.fc_k, conv.fc_v))
    s = (q * conv.sigma_weight).sum(-1)
    rho = (1 - conv.b) * F.elu(conv.beta * (s + conv.sigma_shift) * conv.sigma_scale / (1 - conv.b)) + 1.0
    inv2 = rho / (2 * conv.r0 ** 2)

    d2 = (rvec * rvec).sum(-1)
    logits = (q[dst] * k[src]).sum(-1) / math.sqrt(dh) - d2.unsqueeze(-1) * inv2[dst]
    ex = torch.exp(logits - _segment_max(logits.detach(), dst, N, -math.inf)[dst])
    w = ex / torch.zeros(N, H).index_add(0, dst, ex)[dst]  # [E, H]

    y = torch.zeros(N, H, dh).index_add(0, dst, w.unsqueeze(-1) * v[src])
    b_dist = B.gaussian_distance_basis(d2.sqrt(), conv.num_dist_basis, conv.dist_basis_rmax)  # [E, K]
    agg_dist = torch.zeros(N, H, conv.num_dist_basis).index_add(0, dst, w.unsqueeze(-1) * b_dist.unsqueeze(1))
    y = y + conv.c_dist * torch.einsum("nhk,hdk->nhd", agg_dist, conv.dist_proj.view(H, dh, -1))
    if conv.frame == "max":
        candidate = d2 > CANDIDATE_MIN_D2
        rhat = torch.where(candidate.unsqueeze(-1), rvec / d2.sqrt().clamp_min(1e-12).unsqueeze(-1), torch.zeros_like(rvec))
        frames, tied = max_frames(logits.detach(), w.detach(), rhat, candidate, dst, N)
        cos = torch.einsum("ehkc,ec->ehk", frames[dst], rhat)
        b_ang = B.gaussian_angle_basis(cos, conv.num_angle_basis, conv.angle_basis_width)  # [E, H, 3, D]
        w_ang = (w * candidate.unsqueeze(-1))[:, :, None, None]
        agg = torch.zeros(N, H, 3, conv.num_angle_basis).index_add(0, dst, w_ang * b_ang)
        e3 = agg[:, :, 2]
        e3 = torch.where(tied.unsqueeze(-1), 0.5 * (e3 + e3.flip(-1)), e3)
        agg = torch.cat([agg[:, :, :2], e3.unsqueeze(2)], dim=2)
        y = y + conv.c_angl * torch.einsum("nhkm,khdm->nhd", agg, conv.angle_proj.view(3, H, dh, -1))
    return conv.fc_out(y.reshape(N, H * dh))


def forward(model, g: Dict[str, torch.Tensor]) -> torch.Tensor:
    """``model(bg)`` of a CrystalFramer, from ``plain_inputs(bg)``: one value per crystal."""
    x = model.embedding(g["species"].to(model.embedding.weight.dtype))
    for block in model.blocks:
        x = x + block.dropout(attention_layer(block.attn, x, g))
        x = x + block.dropout(block.ffn(x))
    n = g["num_graphs"]
    counts = torch.zeros(n).index_add_(0, g["graph_id"], torch.ones(x.shape[0]))
    pooled = torch.zeros(n, x.shape[1]).index_add(0, g["graph_id"], x) / counts.unsqueeze(-1)
    return model.head(pooled).squeeze(-1)
