"""Context inputs: test-time augmentation, multi-scale tile features, neighbour means, the context matrix."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from anndata import AnnData

import imagene as ig
from imagene.nn import get_image_encoder


class Flatten(torch.nn.Module):
    """The normalised pixels themselves as features: what an encoder sees can be read back."""

    def forward(self, x):
        return x.flatten(1)


def _pixels_encoder(px: int):
    return get_image_encoder(Flatten(), input_px=px, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))


def _tiles_adata(tiles: np.ndarray) -> AnnData:
    a = AnnData(X=np.zeros((len(tiles), 1), np.float32))
    a.obsm["imagene_tiles"] = tiles
    return a


def _embed(tiles: np.ndarray, **kwargs) -> np.ndarray:
    a = _tiles_adata(tiles)
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False, key_added="f", **kwargs)
    return a.obsm["f"]


# ------------------------------------------------------------------------------------------
# test-time augmentation
# ------------------------------------------------------------------------------------------
def test_tta_of_a_symmetric_tile_equals_the_plain_features():
    # a radial pattern: unchanged by every flip and 90° rotation of the square
    c = np.arange(32) - 15.5
    r = np.sqrt(c[:, None] ** 2 + c[None, :] ** 2)
    tile = np.stack([np.cos(r / 2), np.sin(r / 3), r / r.max()], axis=-1)
    tile = np.round(255 * (tile - tile.min()) / np.ptp(tile)).astype(np.uint8)[None]
    plain = _embed(tile)
    np.testing.assert_allclose(_embed(tile, tta="flips"), plain, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_embed(tile, tta="dihedral"), plain, rtol=1e-5, atol=1e-6)
    # the encoder does see orientation: an asymmetric tile's features change when it is flipped
    ramp = np.broadcast_to(np.linspace(0, 255, 32, dtype=np.uint8)[None, :, None], (32, 32, 3))[None]
    assert not np.allclose(_embed(ramp), _embed(ramp[:, :, ::-1].copy()), atol=1e-4)


def test_tta_is_the_mean_over_flipped_and_rotated_tiles():
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    flips = [tiles, tiles[:, :, ::-1], tiles[:, ::-1], tiles[:, ::-1, ::-1]]
    by_hand = np.mean([_embed(np.ascontiguousarray(t)) for t in flips], axis=0)
    np.testing.assert_allclose(_embed(tiles, tta="flips"), by_hand, rtol=1e-4, atol=1e-5)
    rotations = [np.rot90(tiles, k, axes=(1, 2)) for k in range(4)]
    dihedral = rotations + [np.ascontiguousarray(t[:, :, ::-1]) for t in rotations]
    by_hand = np.mean([_embed(np.ascontiguousarray(t)) for t in dihedral], axis=0)
    np.testing.assert_allclose(_embed(tiles, tta="dihedral"), by_hand, rtol=1e-4, atol=1e-5)


def test_tta_is_recorded_and_checked():
    a = _tiles_adata(np.zeros((2, 32, 32, 3), np.uint8))
    ig.pp.embed_tiles(a, encoder="tiny", tta="flips", show_progress_bar=False)
    assert a.uns["X_he_tiny"]["tta"] == "flips"
    ig.pp.embed_tiles(a, encoder="tiny", show_progress_bar=False, key_added="plain")
    assert a.uns["plain"]["tta"] == "none"
    with pytest.raises(ValueError, match="tta must be one of"):
        ig.pp.embed_tiles(a, encoder="tiny", tta="rotate", show_progress_bar=False)


# ------------------------------------------------------------------------------------------
# multi-scale tiles
# ------------------------------------------------------------------------------------------
@pytest.fixture
def one_image():
    """One 1000-px section at 1 µm per pixel, random pixels, four spots on integer centres."""
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (1000, 1000, 3), dtype=np.uint8)
    xy = np.array([[500.0, 500.0], [300.0, 620.0], [640.0, 280.0], [700.0, 700.0]])
    a = AnnData(X=sp.csr_matrix(np.ones((4, 3), np.float32)), obs=pd.DataFrame(index=[f"s{i}" for i in range(4)]))
    a.obsm["spatial"] = xy
    a.uns["spatial"] = {"lib": {"images": {"fullres": img}, "scalefactors": {"microns_per_pixel": 1.0}}}
    return a, img


def _block_mean(x: np.ndarray, f: int) -> np.ndarray:
    h, w = x.shape[:2]
    return x.reshape(h // f, f, w // f, f, -1).mean((1, 3))


def test_a_larger_tile_covers_the_area_around_the_spot(one_image):
    a, img = one_image
    before = {s: sorted(getattr(a, s)) for s in ("obsm", "uns", "layers", "obsp")}
    obs, x = a.obs.copy(), a.X.copy()
    keys = ig.pp.context_features(
        a, tile_sizes_um=(112, 224), tile_px=56, encoder=_pixels_encoder(56), tta=None, key_prefix="X_px",
        show_progress_bar=False,
    )
    assert keys == ["X_px_112um", "X_px_224um"]
    for i, (cx, cy) in enumerate(a.obsm["spatial"].astype(int)):
        small = a.obsm["X_px_112um"][i].reshape(3, 56, 56).transpose(1, 2, 0)
        large = a.obsm["X_px_224um"][i].reshape(3, 56, 56).transpose(1, 2, 0)
        # the 112 µm tile is the 112 x 112 px window around the spot, halved; the 224 µm one the
        # 224 x 224 px window, quartered: 4 times the area at half the resolution
        crop_small = img[cy - 56 : cy + 56, cx - 56 : cx + 56] / 255.0
        crop_large = img[cy - 112 : cy + 112, cx - 112 : cx + 112] / 255.0
        np.testing.assert_allclose(small, _block_mean(crop_small, 2), atol=1 / 255 + 1e-6)
        np.testing.assert_allclose(large, _block_mean(crop_large, 4), atol=1 / 255 + 1e-6)
        # its central quarter is the small tile at the coarser resolution
        np.testing.assert_allclose(large[14:42, 14:42], _block_mean(small, 2), atol=2 / 255 + 1e-6)
    assert a.uns["X_px_224um"]["tile_size_um"] == 224.0 and a.uns["X_px_224um"]["context"] == "scale"
    # nothing else changed: the tiles were not kept
    after = {s: sorted(getattr(a, s)) for s in ("obsm", "uns", "layers", "obsp")}
    assert after["obsm"] == sorted([*before["obsm"], *keys]) and after["uns"] == sorted([*before["uns"], *keys])
    assert after["layers"] == before["layers"] and after["obsp"] == before["obsp"]
    pd.testing.assert_frame_equal(a.obs, obs)
    assert (a.X != x).nnz == 0


def test_context_features_of_a_real_section_match_the_spot_features(data_dir, tmp_path):
    folder = data_dir / "her2st" / "B4"
    image = next(p for p in folder.iterdir() if p.suffix.lower() in (".jpg", ".jpeg"))
    full = ig.io.read_legacy_st(folder / "B4.tsv.gz", folder / "B4_selection.tsv", image, library_id="B4")
    a = full[:12].copy()
    # the spot-size scale without TTA is exactly what extract_tiles + embed_tiles give
    keys = ig.pp.context_features(a, tile_sizes_um=(112, 448), tile_px=32, encoder="tiny", tta=None, chunk_size=5,
                                  show_progress_bar=False)
    ref = a.copy()
    ig.pp.extract_tiles(ref, tile_size_um=112, tile_px=32, show_progress_bar=False)
    ig.pp.embed_tiles(ref, encoder="tiny", show_progress_bar=False)
    np.testing.assert_allclose(a.obsm[keys[0]], ref.obsm["X_he_tiny"], rtol=1e-5, atol=1e-6)
    ig.pp.extract_tiles(ref, tile_size_um=448, tile_px=32, show_progress_bar=False, key_added="big")
    ig.pp.embed_tiles(ref, encoder="tiny", tiles_key="big", show_progress_bar=False, key_added="X_big")
    np.testing.assert_allclose(a.obsm[keys[1]], ref.obsm["X_big"], rtol=1e-5, atol=1e-6)
    assert not np.allclose(a.obsm[keys[0]], a.obsm[keys[1]])
    assert "imagene_tiles" not in a.obsm


def test_context_features_check_their_sizes(one_image):
    a, _ = one_image
    with pytest.raises(ValueError, match="repeated sizes"):
        ig.pp.context_features(a, tile_sizes_um=(112, 112), encoder="tiny", show_progress_bar=False)
    with pytest.raises(ValueError, match="positive sizes"):
        ig.pp.context_features(a, tile_sizes_um=(0,), encoder="tiny", show_progress_bar=False)
    with pytest.raises(ValueError, match="tta must be one of"):
        ig.pp.context_features(a, tta="mirror", encoder="tiny", show_progress_bar=False)


# ------------------------------------------------------------------------------------------
# neighbour means and the context matrix
# ------------------------------------------------------------------------------------------
@pytest.fixture
def grid():
    """Two sections of jittered grid spots with random features and the 4-NN niche graph."""
    rng = np.random.default_rng(5)
    xy = np.array([[i * 10.0, j * 10.0] for i in range(6) for j in range(5)])
    xy = np.vstack([xy, xy]) + rng.normal(0, 1.5, (60, 2))
    a = AnnData(X=sp.csr_matrix(rng.poisson(2, (60, 4)).astype(np.float32)))
    a.obs_names = [f"c{i}" for i in range(60)]
    a.obs["section"] = pd.Categorical(["A"] * 30 + ["B"] * 30)
    a.obsm["spatial"] = xy
    a.obsm["X_he_enc"] = rng.normal(size=(60, 7)).astype(np.float32)
    a.obsm["X_he_enc_224um"] = rng.normal(size=(60, 3)).astype(np.float32)
    ig.pp.niches(a, n_neighs=4, library_key="section", niche_expression=False)
    return a


def test_neighbor_mean_is_the_mean_over_the_graphs_neighbours(grid):
    a = grid
    x, conn = a.obsm["X_he_enc"], a.obsp["imagene_niche_connectivities"].tocsr()
    obsm, uns = sorted(a.obsm), sorted(a.uns)
    key = ig.pp.neighbor_features(a, "X_he_enc")
    assert key == "X_he_enc_nbr"
    sections = a.obs["section"].to_numpy()
    for i in range(a.n_obs):
        nbrs = [j for j in conn[i].indices if j != i]
        assert len(nbrs) == 4 and (sections[nbrs] == sections[i]).all()  # never across sections
        np.testing.assert_allclose(a.obsm[key][i], x[nbrs].mean(0), rtol=1e-5, atol=1e-6)
    ig.pp.neighbor_features(a, "X_he_enc", include_self=True, key_added="niche")
    for i in (0, 31, 59):
        nbrs = [i, *(j for j in conn[i].indices if j != i)]
        np.testing.assert_allclose(a.obsm["niche"][i], x[nbrs].mean(0), rtol=1e-5, atol=1e-6)
    assert sorted(a.obsm) == sorted([*obsm, key, "niche"]) and sorted(a.uns) == sorted([*uns, key, "niche"])
    assert a.uns[key]["sources"] == ["X_he_enc"] and a.uns[key]["context"] == "neighbors"


def test_distance_weighted_neighbor_mean_by_hand(grid):
    a = grid
    x = a.obsm["X_he_enc"]
    dist = a.obsp["imagene_niche_distances"].tocsr()
    ig.pp.neighbor_features(a, "X_he_enc", weighted=True, key_added="w")
    sigma = np.median([dist[i, j] for i in range(a.n_obs) for j in dist[i].indices if j != i])
    for i in (0, 7, 45):
        nbrs = [j for j in dist[i].indices if j != i]
        w = np.exp(-0.5 * (np.array([dist[i, j] for j in nbrs]) / sigma) ** 2)
        np.testing.assert_allclose(a.obsm["w"][i], (w[:, None] * x[nbrs]).sum(0) / w.sum(), rtol=1e-5, atol=1e-6)
    # nearer neighbours count more: the weighted mean differs from the plain one
    ig.pp.neighbor_features(a, "X_he_enc", key_added="u")
    assert not np.allclose(a.obsm["w"], a.obsm["u"])


def test_neighbor_features_need_the_graph(grid):
    a = grid.copy()
    del a.obsp["imagene_niche_connectivities"]
    with pytest.raises(KeyError, match=r"imagene.pp.niches"):
        ig.pp.neighbor_features(a, "X_he_enc")


def test_context_matrix_concatenates_spot_scales_and_neighbour_mean(grid):
    a = grid
    key = ig.pp.context_matrix(a, ["X_he_enc", "X_he_enc_224um"])
    assert key == "X_he_enc_context"
    m = a.obsm[key]
    assert m.shape == (60, 7 + 3 + 7)
    np.testing.assert_array_equal(m[:, :7], a.obsm["X_he_enc"])
    np.testing.assert_array_equal(m[:, 7:10], a.obsm["X_he_enc_224um"])
    conn = a.obsp["imagene_niche_connectivities"].tocsr()
    nbrs = [j for j in conn[3].indices if j != 3]
    np.testing.assert_allclose(m[3, 10:], a.obsm["X_he_enc"][nbrs].mean(0), rtol=1e-5, atol=1e-6)
    assert a.uns[key]["sources"] == ["X_he_enc", "X_he_enc_224um", "X_he_enc_nbr"]
    assert a.uns[key]["widths"] == [7, 3, 7]
    # a held-out section's context depends on that section alone
    b = a.copy()
    b.obsm["X_he_enc"][:30] += 100.0
    ig.pp.context_matrix(b, ["X_he_enc", "X_he_enc_224um"])
    np.testing.assert_array_equal(b.obsm[key][30:], m[30:])
