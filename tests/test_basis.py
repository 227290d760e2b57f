"""basis.py: the Gaussian bases and their piecewise-polynomial tables."""
import pytest
import torch


@pytest.mark.parametrize("D, width", [(64, 4.0), (16, 1.0)])
def test_angle_basis_table_matches_the_gaussians(D, width):
    """The piecewise-polynomial basis equals the Gaussians to float32 resolution on all of [-1, 1]."""
    from dgl_crystalframer import basis as B
    table, half = B.angle_basis_table(D, width)
    c = torch.linspace(-1, 1, 100001, dtype=torch.float64)
    s, t = B.angle_segments(c.clone(), half)
    approx = ((t.unsqueeze(-1) ** torch.arange(table.shape[1], dtype=torch.float64)).unsqueeze(-1) * table[s]).sum(-2)
    assert (approx - B.gaussian_angle_basis(c, D, width)).abs().max() < 1e-7
