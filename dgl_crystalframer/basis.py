"""Gaussian bases of SPEC.md 2.2 and the constants that fix the attention's reach.

Pure torch (no DGL): a distance basis on |r| and an angular basis on cosines.

The Gaussian attention factor exp(-|r|^2 / (2 sigma^2)) has sigma < SIGMA_MAX = R0 / sqrt(B)
(SPEC.md 2.1), so images farther than N_SIGMA * SIGMA_MAX carry negligible weight.  That is
where the default neighbour cutoff comes from: it is derived, never typed in.
"""
from __future__ import annotations

import math

import torch

R0 = 1.4  # Angstrom: sigma at rho = 1
B = 0.5  # lower bound of rho, so sigma < R0 / sqrt(B)
BETA = 0.1  # slope of rho at 0
N_SIGMA = 3.5  # images within N_SIGMA * SIGMA_MAX are kept (as the reference implementation)
SIGMA_MAX = R0 / math.sqrt(B)

DIST_BASIS_SIZE = 64  # K
DIST_BASIS_RMAX = 14.0  # Angstrom
ANGLE_BASIS_SIZE = 64  # D (16 in the lightweight variant)
ANGLE_BASIS_WIDTH = 4.0  # s_a (1 in the lightweight variant)


def default_cutoff(r0: float = R0, b: float = B, n_sigma: float = N_SIGMA) -> float:
    """Neighbour cutoff (Angstrom) implied by the sigma bound: n_sigma * r0 / sqrt(b) (~6.93 A)."""
    return n_sigma * r0 / math.sqrt(b)


def gaussian_distance_basis(dist: torch.Tensor, size: int = DIST_BASIS_SIZE, r_max: float = DIST_BASIS_RMAX) -> torch.Tensor:
    """b_dist(|r|): ``size`` Gaussians with centres k * r_max / size, k = 1..size, width r_max / size.

    dist: [E] -> [E, size].  The first centre is r_max / size, not 0 (SPEC.md 2.2).
    """
    step = r_max / size
    centres = torch.arange(1, size + 1, device=dist.device, dtype=dist.dtype) * step
    return torch.exp(-0.5 * ((dist.unsqueeze(-1) - centres) / step) ** 2)


def gaussian_angle_basis(cos: torch.Tensor, size: int = ANGLE_BASIS_SIZE, width: float = ANGLE_BASIS_WIDTH) -> torch.Tensor:
    """b_angl(cos): ``size`` Gaussians on [-1, 1], centres -1 + 2m/(size-1), width ``width`` * 2/(size-1).

    cos: [...] -> [..., size], as exp(-((c - mu) * a)^2) with a = 1 / (sqrt(2) * width * spacing).
    The definition; the layer evaluates it through ``angle_basis_table`` (per-edge values for
    every head, axis and centre would be the largest tensor of the model).
    """
    a = 1.0 / (math.sqrt(2.0) * width * 2.0 / (size - 1))
    centres = torch.linspace(-a, a, size, device=cos.device, dtype=cos.dtype)
    return torch.sub((cos * a).unsqueeze(-1), centres).square_().neg_().exp_()


# The angular basis is smooth on the scale of its width sigma, so the layer evaluates it by cubic
# Hermite interpolation between tabulated values and derivatives on a grid of spacing sigma / 16.
# Interpolation error <= step^4 / 384 * max|b^(4)| = 3 / (16^4 * 384) ~ 1.2e-7 (b <= 1), i.e. at
# float32 resolution.  This replaces the [E, H, 3, D] evaluation per edge, head and axis by 4
# weights scattered per edge, head and axis and one small dense matmul (nn._AngularAggregate).
TABLE_POINTS_PER_WIDTH = 16


def angle_basis_table(size: int = ANGLE_BASIS_SIZE, width: float = ANGLE_BASIS_WIDTH,
                      points_per_width: int = TABLE_POINTS_PER_WIDTH):
    """b_angl tabulated for cubic Hermite interpolation -> ``(table [2G, size] float64, step)``.

    Grid g_j = (j - (G-1)/2) * step, symmetric about 0 and covering [-1, 1] with a point of margin,
    so that b(-c) is exactly b(c) reversed.  Rows 0..G-1 hold b(g_j), rows G..2G-1 step * b'(g_j).
    """
    sigma = width * 2.0 / (size - 1)
    step = sigma / points_per_width
    half = math.ceil(1.0 / step) + 1
    grid = (torch.arange(2 * half + 1, dtype=torch.float64) - half) * step
    values = gaussian_angle_basis(grid, size, width)
    z = (grid.unsqueeze(-1) - torch.linspace(-1.0, 1.0, size, dtype=torch.float64)) / sigma
    return torch.cat([values, -z / sigma * step * values]), step  # d/dc exp(-z^2/2) = -z/sigma * b


def hermite_taps(x: torch.Tensor, step: float, num_points: int):
    """Where ``x`` falls on the symmetric grid of ``angle_basis_table`` -> ``(j, coef)``.

    j: int64, the shape of x, the grid point left of x; coef: [..., 4], the cubic Hermite weights
    of (value at j, value at j+1, step * derivative at j, step * derivative at j+1).
    """
    half = (num_points - 1) // 2
    u = (x / step + half).clamp_(0, num_points - 1)
    j = u.floor().clamp_(max=num_points - 2)
    t = u - j
    t2 = t * t
    t3 = t2 * t
    coef = torch.stack([2 * t3 - 3 * t2 + 1, 3 * t2 - 2 * t3, t3 - 2 * t2 + t, t3 - t2], dim=-1)
    return j.long(), coef
