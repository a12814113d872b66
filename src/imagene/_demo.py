"""The main job: read → tiles → embed → niches → train on all but one section → predict the held-out one."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

logger = logging.getLogger("imagene")

#: the embedded default: four synthetic H&E + ST sections (``imagene.datasets.synthetic_he_st``)
SYNTHETIC = {"n_obs": 1000, "n_vars": 200, "n_sections": 4, "image_px": 1024, "microns_per_pixel": 1.6,
             "n_domains": 4}


def load_demo_data(
    data: str | os.PathLike | None = None,
    *,
    dataset: str | None = None,
    sections: Sequence[str] | None = None,
    seed: int = 0,
):
    """The sections the demo runs on, and a one-line description of where they come from.

    ``data`` (a folder of legacy-ST section folders in the her2st layout) and ``dataset``
    (``"her2st"``: downloaded from the authors' repository) are exclusive; with neither, four
    synthetic sections from :func:`imagene.datasets.synthetic_he_st` (the embedded default).

    Returns
    -------
    ``(adata, description)`` with ``obs['section']``.
    """
    import imagene as ig
    from imagene.datasets._her2st import HER2ST_SECTIONS, section_folders

    if data is not None and dataset is not None:
        raise ValueError("Pass either `data` (a local folder) or `dataset` (a name to download), not both.")
    if data is not None:
        found = section_folders(data)
        if not found:
            raise FileNotFoundError(
                f"No section folders in {data}: it must hold one folder per section (<S>/<S>.tsv.gz, "
                "<S>_selection.tsv, one H&E image), as the her2st release does."
            )
        if sections is None:
            sections = list(HER2ST_SECTIONS) if set(HER2ST_SECTIONS) <= set(found) else found
        adata = ig.datasets.her2st(list(sections), path=data)
        return adata, f"legacy ST sections from {data}"
    if dataset is not None:
        if dataset != "her2st":
            raise ValueError(f"Unknown dataset {dataset!r}; the demo can download 'her2st'.")
        adata = ig.datasets.her2st(list(sections) if sections is not None else HER2ST_SECTIONS)
        return adata, "her2st (Andersson et al., Nat Commun 2021), downloaded from the authors' repository"
    adata = ig.datasets.synthetic_he_st(**SYNTHETIC, seed=seed)
    if sections is not None:
        adata = adata[adata.obs["section"].isin(list(sections))].copy()
    return adata, "synthetic H&E + ST sections (imagene.datasets.synthetic_he_st), not real tissue"


def run_demo(
    out: str | os.PathLike = "imagene_demo",
    *,
    data: str | os.PathLike | None = None,
    dataset: str | None = None,
    sections: Sequence[str] | None = None,
    test_section: str | None = None,
    encoder: str = "efficientnet_lite0",
    tile_size_um: float = 112.0,
    tile_px: int = 224,
    max_epochs: int = 100,
    k: int = 50,
    seed: int = 0,
    show_progress_bar: bool = True,
) -> dict:
    """Run imagene end to end: train UMPIRE on all sections but one and predict the held-out one from H&E.

    The default data are four **synthetic** sections (:func:`imagene.datasets.synthetic_he_st`:
    H&E-like texture, tissue domains, section effects, expression tied to morphology), so the demo
    runs offline with nothing downloaded. ``data=`` runs the same flow on a folder of real
    legacy-ST sections in the her2st layout (default sections there: B4, C2, C3, C4 when present,
    else every section folder), ``dataset="her2st"`` downloads those four sections.

    Writes ``<out>/imagene_demo.h5ad`` (obsm / obsp / layers written by imagene), ``metrics.json``
    (held-out mean Pearson r over the 50 most variable and 50 most expressed training genes, next
    to the ridge probe on the same frozen features) and ``predicted_vs_measured.png``.

    Parameters
    ----------
    out
        Output folder.
    data
        Folder of section folders (see :func:`imagene.datasets.her2st`).
    dataset
        ``"her2st"`` to download the four her2st sections with a full-size H&E.
    sections
        Sections to use (default: see above; synthetic ones are ``S0`` … ``S3``).
    test_section
        Section held out (default: the last one).

    Returns
    -------
    The metrics dictionary (also written to ``metrics.json``).
    """
    import matplotlib

    matplotlib.use("Agg")
    import imagene as ig
    from imagene._utils import log_normalize
    from imagene.bench import RidgeProbe
    from imagene.metrics import gene_pearson, mean_pearson, mse, top_expressed_genes, top_variable_genes

    t0 = time.perf_counter()
    timings = {}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ig.settings.seed = seed
    adata, source = load_demo_data(data, dataset=dataset, sections=sections, seed=seed)
    sections = list(dict.fromkeys(adata.obs["section"].astype(str)))
    if len(sections) < 2:
        raise ValueError(f"The demo needs at least 2 sections (one to hold out); got {sections}.")
    test_section = sections[-1] if test_section is None else test_section
    if test_section not in sections:
        raise ValueError(f"test_section {test_section!r} must be one of the sections {sections}.")
    timings["read_s"] = time.perf_counter() - t0
    logger.info("Demo data: %s; holding out %s.", source, test_section)
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
    ig.model.UMPIRE.setup_anndata(train, layer="counts", image_key=image_key, library_key="section")
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
    probe_pred = RidgeProbe().fit_predict(train.obsm[image_key], y_train, test.obsm[image_key], seed=seed)
    mean_pred = np.broadcast_to(y_train.mean(0), y_test.shape)
    ump = test.layers["imagene_predicted"]
    result: dict = {
        "data": source,
        "synthetic": data is None and dataset is None,
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
            r = mean_pearson(y_test[:, idx], pred[:, idx])
            block[method] = {
                "mean_pearson": r if np.isfinite(r) else None,
                "n_undefined": int(np.isnan(gene_pearson(y_test[:, idx], pred[:, idx])).sum()),
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
    genes_to_show = [g for g in ["ERBB2"] if g in test.var_names]  # the her2st marker, when present
    genes_to_show += [g for g in result["hvg50"]["genes"] if g not in genes_to_show][: 3 - len(genes_to_show)]
    fig = ig.pl.predicted_vs_measured(test, genes_to_show, library_id=test_section)
    fig.savefig(out / "predicted_vs_measured.png", dpi=110, bbox_inches="tight")
    (out / "metrics.json").write_text(json.dumps(result, indent=2))
    return result
