"""The main job: read → tiles → embed → niches → train on all but one section → predict the held-out one."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from imagene.bench._baselines import ridge_probe  # re-exported: tutorials import it from here

logger = logging.getLogger("imagene")


def run_demo(
    out: str | os.PathLike = "imagene_demo",
    *,
    test_section: str = "C4",
    sections: Sequence[str] = ("B4", "C2", "C3", "C4"),
    encoder: str = "efficientnet_lite0",
    tile_size_um: float = 112.0,
    tile_px: int = 224,
    max_epochs: int = 100,
    k: int = 50,
    seed: int = 0,
    show_progress_bar: bool = True,
) -> dict:
    """Run imagene end to end on the real her2st sample shipped with the package.

    Writes ``<out>/imagene_demo.h5ad`` (obsm / obsp / layers written by imagene), ``metrics.json``
    (held-out mean Pearson r over the 50 most variable and 50 most expressed training genes, next
    to the ridge probe on the same frozen features) and ``predicted_vs_measured.png``.

    Returns
    -------
    The metrics dictionary (also written to ``metrics.json``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import imagene as ig
    from imagene._utils import log_normalize
    from imagene.metrics import gene_pearson, mse, top_expressed_genes, top_variable_genes

    t0 = time.perf_counter()
    timings = {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ig.settings.seed = seed
    if test_section not in sections:
        raise ValueError(f"test_section {test_section!r} must be one of sections {list(sections)}.")

    adata = ig.datasets.her2st_demo(sections=tuple(sections))
    timings["read_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    ig.pp.extract_tiles(adata, tile_size_um=tile_size_um, tile_px=tile_px, show_progress_bar=show_progress_bar)
    timings["tiles_s"] = time.perf_counter() - t
    t = time.perf_counter()
    ig.pp.embed_tiles(adata, encoder=encoder, show_progress_bar=show_progress_bar)
    timings["embed_s"] = time.perf_counter() - t
    image_key = f"X_he_{encoder}"
    ig.pp.niches(adata, n_neighs=6, library_key="section")
    ig.pp.section_split(adata, test_sections=[test_section])

    is_train = (adata.obs["imagene_split"] == "train").to_numpy()
    # genes chosen on the training sections only: detected in >= 10 % of training spots
    counts = adata.layers["counts"]
    detected = np.asarray((counts[is_train] > 0).mean(0)).ravel()
    genes = adata.var_names[detected >= 0.10]
    adata = adata[:, genes].copy()
    del adata.obsm["imagene_tiles"]  # tiles are not needed past this point (and are large in an h5ad)
    train = adata[is_train].copy()
    test = adata[~is_train].copy()

    t = time.perf_counter()
    ig.model.UMPIRE.setup_anndata(train, layer="counts", image_key=image_key, batch_key="section")
    model = ig.model.UMPIRE(train)
    model.train(max_epochs=max_epochs, enable_progress_bar=show_progress_bar)
    timings["train_s"] = time.perf_counter() - t
    epochs_run = len(model.history["train_loss"]) if "train_loss" in model.history else None

    t = time.perf_counter()
    for modality in ("image", "gene", "joint"):
        adata.obsm[f"X_imagene_{modality}"] = model.get_latent_representation(adata, modality=modality)
    adata.layers["imagene_predicted"] = model.predict_expression(adata, k=k, return_numpy=True)
    ig.tl.predict_expression(model, test, k=k)
    timings["predict_s"] = time.perf_counter() - t

    y_train = log_normalize(train.layers["counts"])
    y_test = log_normalize(test.layers["counts"])
    probe_pred = ridge_probe(train.obsm[image_key], y_train, test.obsm[image_key], seed=seed)
    mean_pred = np.broadcast_to(y_train.mean(0), y_test.shape)
    ump = test.layers["imagene_predicted"]
    result: dict = {
        "data": "her2st (Andersson et al. 2021), shipped sample",
        "train_sections": sorted(set(train.obs["section"].astype(str))),
        "test_section": test_section,
        "n_train_spots": int(train.n_obs),
        "n_test_spots": int(test.n_obs),
        "n_genes": int(adata.n_vars),
        "encoder": encoder,
        "tile_size_um": tile_size_um,
        "tile_px": tile_px,
        "epochs_run": epochs_run,
        "k": k,
        "prediction_space": "log1p(counts per 10k)",
    }
    for name, idx in (("hvg50", top_variable_genes(y_train, 50)), ("heg50", top_expressed_genes(y_train, 50))):
        block = {"genes": adata.var_names[idx].tolist()}
        for method, pred in (("umpire", ump), ("ridge_probe", probe_pred), ("mean_expression", mean_pred)):
            r = gene_pearson(y_test[:, idx], pred[:, idx])
            block[method] = {
                "mean_pearson": float(np.nanmean(r)) if np.isfinite(r).any() else None,
                "n_undefined": int(np.isnan(r).sum()),
                "mse_log1p": mse(y_test[:, idx], pred[:, idx]),
            }
        result[name] = block
    timings["total_s"] = time.perf_counter() - t0
    result["timings"] = {k_: round(v, 2) for k_, v in timings.items()}

    adata.uns["imagene_demo"] = {
        "note": "layers['imagene_predicted'] is out-of-sample only for the test section (obs['imagene_split'])",
        "test_section": test_section,
    }
    adata.write_h5ad(out / "imagene_demo.h5ad", compression="gzip")
    genes_to_show = [g for g in ["ERBB2"] if g in test.var_names]
    genes_to_show += [g for g in result["hvg50"]["genes"] if g not in genes_to_show][: 3 - len(genes_to_show)]
    fig = ig.pl.predicted_vs_measured(test, genes_to_show, library_id=test_section)
    fig.savefig(out / "predicted_vs_measured.png", dpi=110, bbox_inches="tight")
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
