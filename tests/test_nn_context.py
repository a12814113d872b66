"""The context image tower (imagene.nn.ContextTower)."""

import numpy as np
import pytest
import torch

from imagene.nn import ContextTower


def test_shapes_and_bad_width():
    tower = ContextTower([16, 8, 16], n_output=5, d_model=32, n_heads=4)
    assert tower(torch.randn(7, 40)).shape == (7, 5)
    with pytest.raises(ValueError, match=r"expects \(n, 40\).*context_matrix"):
        tower(torch.randn(7, 39))
    with pytest.raises(ValueError, match="multiple of n_heads"):
        ContextTower([16], n_output=2, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="positive width"):
        ContextTower([], n_output=2)


def test_learns_a_target_carried_by_the_neighbour_block():
    """The target lives in the neighbour token only: the tower must read it, a spot-only fit cannot."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    n, d = 1536, 8
    spot, scale, nbr = (rng.normal(size=(n, d)).astype(np.float32) for _ in range(3))
    w = rng.normal(size=(d, 3)).astype(np.float32)
    y = torch.as_tensor(np.tanh(nbr @ w))
    x = torch.as_tensor(np.concatenate([spot, scale, nbr], axis=1))
    m = 1024
    tr, te = slice(0, m), slice(m, None)
    tower = ContextTower([d, d, d], n_output=3, d_model=32, n_heads=4, dropout=0.0)
    opt = torch.optim.AdamW(tower.parameters(), lr=3e-3)
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(tower(x[tr]), y[tr])
        opt.zero_grad()
        loss.backward()
        opt.step()
    tower.eval()
    with torch.no_grad():
        pred = tower(x[te])
    resid = float(((pred - y[te]) ** 2).sum() / ((y[te] - y[tr].mean(0)) ** 2).sum())
    # least squares on the spot block alone, fitted on the same training rows
    a = np.c_[spot[:m], np.ones(m)]
    coef, *_ = np.linalg.lstsq(a, y[tr].numpy(), rcond=None)
    spot_pred = np.c_[spot[m:], np.ones(n - m)] @ coef
    spot_resid = float(((spot_pred - y[te].numpy()) ** 2).sum() / ((y[te].numpy() - y[tr].numpy().mean(0)) ** 2).sum())
    assert spot_resid > 0.95  # the spot carries nothing about the target
    assert resid < 0.3, f"held-out residual fraction {resid:.2f}"


def test_image_tower_with_context_widths_is_a_context_tower_that_reads_every_block():
    from imagene.nn import ImageTower

    torch.manual_seed(0)
    plain = ImageTower(32, 8, n_hidden=16)
    assert plain.context_widths is None and isinstance(plain.norm, torch.nn.LayerNorm)
    tower = ImageTower(32, 8, n_hidden=16, dropout=0.0, context_widths=[16, 16], context_kwargs={"n_heads": 2})
    assert isinstance(tower.head, ContextTower) and isinstance(tower.norm, torch.nn.Identity)
    assert tower.head.widths == [16, 16] and tower.head.proj[0][1].out_features == 16  # d_model = n_hidden
    tower.eval()
    x = torch.randn(5, 32)
    y = x.clone()
    y[:, 16:] = torch.randn(5, 16)  # change the neighbour block only
    with torch.no_grad():
        assert tower(x).shape == (5, 8)
        assert not torch.allclose(tower(x), tower(y))
    with pytest.raises(ValueError, match=r"sum to 30, but the image input has 32.*context_matrix"):
        ImageTower(32, 8, context_widths=[16, 14])
    with pytest.raises(ValueError, match="cannot be combined with an image encoder"):
        ImageTower(0, 8, encoder="tiny", context_widths=[16, 16])
