"""Pixel unshuffle (v2 layout) against the spec's closed-form index map, and the mlp1 projector layout."""

from __future__ import annotations

import pytest
import torch

from ivl.errors import ModelInputError
from ivl.models.connector import Projector, pixel_unshuffle


def _closed_form(x: torch.Tensor) -> torch.Tensor:
    """Spec §1.3: token t = r*(w/2) + c holds [(2r,2c) | (2r,2c+1) | (2r+1,2c) | (2r+1,2c+1)]."""
    n, h, w, c = x.shape
    out = torch.empty(n, h // 2, w // 2, 4 * c, dtype=x.dtype)
    for r in range(h // 2):
        for q in range(w // 2):
            out[:, r, q] = torch.cat(
                [x[:, 2 * r, 2 * q], x[:, 2 * r, 2 * q + 1], x[:, 2 * r + 1, 2 * q], x[:, 2 * r + 1, 2 * q + 1]], -1
            )
    return out


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (1, 4, 6, 5), (3, 32, 32, 2)])
def test_matches_closed_form(shape):
    x = torch.randn(shape)
    assert torch.equal(pixel_unshuffle(x, 0.5), _closed_form(x))


def test_token_order_with_index_labels():
    # Label each patch by its flat row-major index; check the first two tokens of a 4x4 grid exactly.
    grid = torch.arange(16.0).view(1, 4, 4, 1)
    out = pixel_unshuffle(grid).reshape(1, 4, 4)  # [n, tokens, 4C]
    assert out[0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]


def test_rejects_odd_grid_and_bad_rank():
    with pytest.raises(ModelInputError, match="5x4"):
        pixel_unshuffle(torch.zeros(1, 5, 4, 2))
    with pytest.raises(ModelInputError, match="n, h, w, C"):
        pixel_unshuffle(torch.zeros(5, 4, 2))


def test_projector_layout_and_math():
    proj = Projector(16, 8)
    assert [k for k in proj.state_dict()] == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert proj[0].eps == 1e-5
    x = torch.randn(2, 3, 16)
    ln = torch.nn.functional.layer_norm(x, (16,), proj[0].weight, proj[0].bias, 1e-5)
    h = ln @ proj[1].weight.T + proj[1].bias
    h = 0.5 * h * (1 + torch.erf(h / 2**0.5))  # exact GELU
    want = h @ proj[3].weight.T + proj[3].bias
    assert torch.allclose(proj(x), want, atol=1e-6)
