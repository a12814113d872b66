"""imagene.datasets: published sections read from a path or downloaded (served locally), and the synthetic generator."""

from __future__ import annotations

import functools
import http.server
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import imagene.datasets as ds
from imagene.datasets import _her2st

SECTIONS = ("B4", "C2", "C3", "C4")
PATIENT = {"B4": "B", "C2": "C", "C3": "C", "C4": "C"}
#: spots under tissue (selected == 1) that have a row in the counts, counted by hand from the files
N_SPOTS = {"B4": 283, "C2": 187, "C3": 180, "C4": 184}
PKG = Path(ds.__file__).resolve().parents[1]  # src/imagene


def _key(tab: pd.DataFrame) -> pd.Index:
    return pd.Index(tab["x"].round().astype(int).astype(str) + "x" + tab["y"].round().astype(int).astype(str))


@pytest.fixture(scope="module")
def originals(data_dir):
    out = {}
    for s in (*SECTIONS, "A1"):
        counts = pd.read_csv(data_dir / "her2st" / s / f"{s}.tsv.gz", sep="\t", index_col=0)
        tab = pd.read_csv(data_dir / "her2st" / s / f"{s}_selection.tsv", sep="\t")
        tab.index = _key(tab)
        out[s] = (counts, tab)
    return out


def _section(adata, s):
    sub = adata[adata.obs["section"] == s]
    keys = [f"{x}x{y}" for x, y in zip(sub.obs["array_x"], sub.obs["array_y"], strict=True)]
    return sub, pd.Index(keys)


# ---------------------------------------------------------------- nothing third-party ships


def test_package_ships_no_third_party_data():
    """Package data: only the gene-description table (from Bioconductor annotation packages), well under 5 MB."""
    files = [f for f in PKG.rglob("*") if f.is_file() and f.suffix not in (".py", ".pyc", ".typed")]
    names = sorted(f.relative_to(PKG).as_posix() for f in files if "__pycache__" not in f.parts)
    assert names == ["datasets/_data/gene_texts.tsv.gz"], names
    assert sum(f.stat().st_size for f in files) < 3e6


# ---------------------------------------------------------------- her2st / MOB from a local path


@pytest.fixture(scope="module")
def her2st_local(data_dir):
    return ds.her2st(path=data_dir / "her2st", show_progress_bar=False)


def test_her2st_from_path_sections_spots_and_patients(her2st_local, originals):
    a = her2st_local
    assert list(a.obs["section"].cat.categories) == list(SECTIONS)
    assert set(a.uns["spatial"]) == set(SECTIONS)
    assert "6012" in a.uns["dataset"]["citation"] and "none stated" in a.uns["dataset"]["licence"]
    for s in SECTIONS:
        counts, tab = originals[s]
        expected = tab.index[tab["selected"] == 1].intersection(counts.index)
        assert len(expected) == N_SPOTS[s]
        sub, keys = _section(a, s)
        assert sub.n_obs == N_SPOTS[s] and set(keys) == set(expected)
        assert (sub.obs["patient"] == PATIENT[s]).all()
        np.testing.assert_array_equal(sub.obsm["spatial"], tab.loc[keys, ["pixel_x", "pixel_y"]].to_numpy(float))
        # the full-size image of the release is the tile source: no downscaled copy in between
        meta = a.uns["spatial"][s]["metadata"]
        assert meta["source_image_scale"] == 1.0
        assert Path(meta["source_image_path"]).name == _her2st.HER2ST_REMOTE[s]["image"].name




def test_her2st_from_path_counts_equal_originals(her2st_local, originals):
    common = set.intersection(*(set(originals[s][0].columns) for s in SECTIONS))
    assert set(her2st_local.var_names) == common  # inner join over the sections
    genes = list(her2st_local.var_names)
    for s in SECTIONS:
        sub, keys = _section(her2st_local, s)
        expected = originals[s][0].loc[keys, genes].to_numpy()
        for layer in (sub.X, sub.layers["counts"]):
            got = layer.toarray() if sp.issparse(layer) else np.asarray(layer)
            np.testing.assert_array_equal(got, expected)


def test_her2st_a1_labels_and_downscaled_image(data_dir, originals):
    a = ds.her2st(["A1"], path=data_dir / "her2st", show_progress_bar=False)
    counts, tab = originals["A1"]
    assert a.n_obs == len(tab.index[tab["selected"] == 1].intersection(counts.index))
    assert (a.obs["patient"] == "A").all()
    lab = pd.read_csv(data_dir / "her2st" / "A1" / "A1_labeled_coordinates.tsv", sep="\t")
    lab.index = _key(lab)
    _, keys = _section(a, "A1")
    got = a.obs["label"].astype(object).to_numpy()
    joined = lab["label"].reindex(keys).to_numpy()
    known = pd.notna(joined)
    assert pd.notna(got).sum() == known.sum() > 300
    assert (got[known] == joined[known]).all()
    # A1's image is a 2000-px-wide copy of the 6954-px slide: its scale is applied, spots stay in full-res pixels
    assert a.uns["spatial"]["A1"]["metadata"]["source_image_scale"] == pytest.approx(2000 / 6954)


def test_mouse_olfactory_bulb_from_path(data_dir):
    a = ds.mouse_olfactory_bulb(path=data_dir / "mouse_olfactory_bulb", show_progress_bar=False)
    assert list(a.obs["section"].cat.categories) == ["MOB1", "MOB2"]
    assert a.var_names.str.startswith("ENSMUSG").all()
    tab = pd.read_csv(data_dir / "mouse_olfactory_bulb" / "MOB1" / "alignment_table_MOB1.tsv", sep="\t")
    counts = pd.read_csv(data_dir / "mouse_olfactory_bulb" / "MOB1" / "MOB1.tsv", sep="\t", index_col=0)
    tab.index = _key(tab)
    n_expected = len(tab.index[tab["selected"] == 1].intersection(counts.index))
    assert (a.obs["section"] == "MOB1").sum() == n_expected
    assert "MIT" in a.uns["dataset"]["licence"]


def test_data_env_variable_is_the_default_path(data_dir, monkeypatch):
    monkeypatch.setenv("IMAGENE_DATA_DIR", str(data_dir))
    a = ds.her2st("C2", show_progress_bar=False)
    assert a.n_obs == N_SPOTS["C2"]
    monkeypatch.setenv("IMAGENE_DATA_DIR", str(data_dir / "nowhere"))
    with pytest.raises(FileNotFoundError, match="IMAGENE_DATA_DIR"):
        ds.her2st("C2")


def test_bad_sections_and_paths(data_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Z9.*section folders found.*B4"):
        ds.her2st("Z9", path=data_dir / "her2st")
    with pytest.raises(ValueError, match="empty"):
        ds.her2st([], path=data_dir / "her2st")
    with pytest.raises(ValueError, match="duplicates"):
        ds.her2st(["C2", "C2"], path=data_dir / "her2st")
    with pytest.raises(FileNotFoundError, match="not a folder"):
        ds.her2st("C2", path=tmp_path / "missing")
    (tmp_path / "C2").mkdir()
    (tmp_path / "C2" / "C2.tsv.gz").write_bytes((data_dir / "her2st" / "C2" / "C2.tsv.gz").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"lacks spot table.*H&E image"):
        ds.her2st("C2", path=tmp_path)


# ---------------------------------------------------------------- download, served from 127.0.0.1


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # keep the test output clean
        pass


@pytest.fixture
def mirror(data_dir, tmp_path):
    """A local HTTP server (127.0.0.1, a free port) with the authors' repository layout, built from links to the data.

    Yields ``(base_url, root, requests)``: ``requests`` lists the paths the server was asked for.
    """
    root = tmp_path / "mirror"
    for dataset, remote in (("her2st", _her2st.HER2ST_REMOTE), ("mouse_olfactory_bulb", _her2st.MOB_REMOTE)):
        for section, files in remote.items():
            for f in files.values():
                target = root / dataset / f.remote
                target.parent.mkdir(parents=True, exist_ok=True)
                target.symlink_to(data_dir / dataset / section / f.name)
    asked: list[str] = []

    class Handler(_Quiet):
        def do_GET(self):
            asked.append(self.path)
            super().do_GET()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root, asked
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def test_her2st_download_verifies_and_caches(mirror, tmp_path, monkeypatch, data_dir):
    url, _, asked = mirror
    monkeypatch.delenv("IMAGENE_DATA_DIR", raising=False)
    cache = tmp_path / "cache"
    a = ds.her2st(["C2", "A1"], cache_dir=cache, base_url=f"{url}/her2st", show_progress_bar=False)
    # the same files as the local copy, byte for byte, in the cache's section folders
    for s in ("C2", "A1"):
        for f in _her2st.HER2ST_REMOTE[s].values():
            assert (cache / "her2st" / s / f.name).read_bytes() == (data_dir / "her2st" / s / f.name).read_bytes()
    assert len(asked) == 7  # C2: counts, spots, image; A1: the same and its labels
    local = ds.her2st(["C2", "A1"], path=data_dir / "her2st", show_progress_bar=False)
    np.testing.assert_array_equal(a.X.toarray(), local.X.toarray())
    assert list(a.var_names) == list(local.var_names)
    assert (a.obs["label"].astype(str) == local.obs["label"].astype(str)).all()
    # a second call reads the cache: nothing is requested again
    ds.her2st(["C2"], cache_dir=cache, base_url=f"{url}/her2st", show_progress_bar=False)
    assert len(asked) == 7


def test_mouse_olfactory_bulb_download(mirror, tmp_path, monkeypatch):
    url, _, asked = mirror
    monkeypatch.delenv("IMAGENE_DATA_DIR", raising=False)
    monkeypatch.setenv("IMAGENE_CACHE_DIR", str(tmp_path / "envcache"))  # the default cache follows the variable
    a = ds.mouse_olfactory_bulb("MOB2", base_url=f"{url}/mouse_olfactory_bulb", show_progress_bar=False)
    assert a.n_obs > 300 and len(asked) == 3
    assert (tmp_path / "envcache" / "mouse_olfactory_bulb" / "MOB2" / "MOB2.jpg").is_file()


def test_download_of_a_changed_file_is_refused_and_not_kept(mirror, tmp_path, monkeypatch):
    url, root, _ = mirror
    monkeypatch.delenv("IMAGENE_DATA_DIR", raising=False)
    spots = root / "her2st" / "data" / "ST-spotfiles" / "C3_selection.tsv"
    text = spots.read_text()
    spots.unlink()
    spots.write_text(text.replace("\t1\n", "\t0\n", 1))  # one spot de-selected: a different file
    cache = tmp_path / "cache"
    with pytest.raises(ValueError, match=r"SHA-256 mismatch.*path="):
        ds.her2st("C3", cache_dir=cache, base_url=f"{url}/her2st", show_progress_bar=False)
    assert not (cache / "her2st" / "C3" / "C3_selection.tsv").exists()


def test_offline_download_names_path_and_url(tmp_path, monkeypatch):
    monkeypatch.delenv("IMAGENE_DATA_DIR", raising=False)
    import socket

    with socket.socket() as s:  # a port nothing listens on: the connection is refused at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ConnectionError, match=r"127\.0\.0\.1.*B4\.tsv\.gz.*github\.com/almaan/her2st.*path="):
        ds.her2st("B4", cache_dir=tmp_path, base_url=f"http://127.0.0.1:{port}", show_progress_bar=False)
    with pytest.raises(KeyError, match=r"cannot be downloaded.*path="):
        ds.her2st("H1", cache_dir=tmp_path)


def test_default_source_is_the_authors_repository():
    """The URLs a user downloads from: the authors' own repositories, raw files, one hash each."""
    assert _her2st.HER2ST_URL.startswith("https://github.com/almaan/her2st/")
    assert _her2st.MOB_URL.startswith("https://github.com/jbergenstrahle/STUtility/")
    for remote in (_her2st.HER2ST_REMOTE, _her2st.MOB_REMOTE):
        for files in remote.values():
            assert all(len(f.sha256) == 64 and int(f.sha256, 16) >= 0 for f in files.values())


# ---------------------------------------------------------------- synthetic


def _patch_means(img: np.ndarray, xy: np.ndarray, radius: int) -> np.ndarray:
    out = []
    for x, y in np.round(xy).astype(int):
        out.append(img[max(0, y - radius) : y + radius + 1, max(0, x - radius) : x + radius + 1].reshape(-1, 3).mean(0))
    return np.asarray(out)


def test_synthetic_deterministic_per_seed():
    a = ds.synthetic_he_st(n_obs=60, n_vars=20, seed=3)
    b = ds.synthetic_he_st(n_obs=60, n_vars=20, seed=3)
    c = ds.synthetic_he_st(n_obs=60, n_vars=20, seed=4)
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    np.testing.assert_array_equal(a.obsm["spatial"], b.obsm["spatial"])
    assert (a.obs["domain"] == b.obs["domain"]).all()
    for lib in a.uns["spatial"]:
        img_a, img_b = (d.uns["spatial"][lib]["images"]["hires"] for d in (a, b))
        np.testing.assert_array_equal(img_a, img_b)
    assert not np.array_equal(a.X.toarray(), c.X.toarray())
    assert not np.array_equal(a.uns["spatial"]["S0"]["images"]["hires"], c.uns["spatial"]["S0"]["images"]["hires"])


def test_synthetic_layout_and_integer_counts():
    a = ds.synthetic_he_st(n_obs=101, n_vars=17, n_sections=2, image_px=256, microns_per_pixel=0.5, seed=1)
    assert a.shape == (101, 17)
    assert a.obs["section"].value_counts().to_dict() == {"S0": 51, "S1": 50}
    assert isinstance(a.obs["domain"].dtype, pd.CategoricalDtype)
    x = a.X.toarray()
    assert (x >= 0).all() and np.array_equal(x, np.round(x)) and x.sum() > 0
    np.testing.assert_array_equal(x, a.layers["counts"].toarray())
    assert a.obs_names.is_unique
    for lib in ("S0", "S1"):
        entry = a.uns["spatial"][lib]
        img = entry["images"]["hires"]
        assert img.shape == (256, 256, 3) and img.dtype == np.uint8
        assert entry["scalefactors"]["tissue_hires_scalef"] == 1.0
        assert entry["scalefactors"]["microns_per_pixel"] == 0.5
        assert entry["scalefactors"]["spot_diameter_fullres"] > 0
        assert entry["metadata"]["platform"] == "synthetic"
        xy = a.obsm["spatial"][(a.obs["section"] == lib).to_numpy()]
        assert (xy > 0).all() and (xy < 256).all()
        # a regular grid: one distinct pitch between neighbours along x
        steps = np.unique(np.round(np.diff(np.unique(xy[:, 0])), 6))
        assert len(steps) == 1


def test_synthetic_domain_signal_in_image_and_expression():
    a = ds.synthetic_he_st(n_obs=300, n_vars=60, n_sections=2, seed=0)
    dom = a.obs["domain"].cat.codes.to_numpy()
    k = len(a.obs["domain"].cat.categories)
    assert k == 3 and all((dom == j).sum() >= 10 for j in range(k))

    # image: mean colour around each spot; nearest domain centroid recovers the domain
    colour = np.zeros((a.n_obs, 3))
    for lib in a.uns["spatial"]:
        m = (a.obs["section"] == lib).to_numpy()
        colour[m] = _patch_means(a.uns["spatial"][lib]["images"]["hires"].astype(float), a.obsm["spatial"][m], 6)
    centroids = np.stack([colour[dom == j].mean(0) for j in range(k)])
    pred = np.argmin(((colour[:, None] - centroids[None]) ** 2).sum(-1), axis=1)
    assert (pred == dom).mean() > 0.9

    # expression (raw counts; library sizes do not depend on the domain): each domain's marker genes
    # are clearly higher there (generated 4x), the other genes are not
    x = a.X.toarray()
    marker = a.var["marker_of"].astype(str).to_numpy()
    for j, name in enumerate(a.obs["domain"].cat.categories):
        for genes, lo, hi in ((marker == name, 2.5, 6.0), (marker == "none", 0.8, 1.25)):
            assert genes.sum() > 0
            ratio = x[dom == j][:, genes].mean(0) / x[dom != j][:, genes].mean(0)
            assert lo < np.median(ratio) < hi


def test_synthetic_bad_input():
    with pytest.raises(ValueError, match="n_sections"):
        ds.synthetic_he_st(n_obs=2, n_sections=3)
    with pytest.raises(ValueError, match="microns_per_pixel"):
        ds.synthetic_he_st(microns_per_pixel=0)
    with pytest.raises(TypeError, match="n_obs"):
        ds.synthetic_he_st(n_obs=10.5)
