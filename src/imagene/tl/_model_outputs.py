"""Write a trained model's latents and predictions into an AnnData."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import check_adata, save_key

logger = logging.getLogger("imagene")


def embed(
    model: Any, adata: AnnData | None = None, *, modality: str = "joint", key_added: str | None = None, **kwargs: Any
) -> None:
    """Write a model's latent representation to ``obsm``.

    Genes follow the rule of :func:`predict_expression`: the gene side reads the query's counts of
    the model's genes, matched by name (missing genes count as zero, with a warning); the image
    side needs no expression at all.

    Parameters
    ----------
    model
        A trained imagene model (also one loaded with ``Model.load(dir)`` alone).
    adata
        AnnData to embed (the model's training AnnData when ``None``).
    modality
        ``'image'``, ``'gene'`` or ``'joint'`` (models may offer more, e.g. ``'niche'``).
    key_added
        ``obsm`` key; defaults to ``f"X_imagene_{modality}"``.
    **kwargs
        Passed to the model's ``get_latent_representation``, e.g. ``scale=`` and ``pooling=`` of
        :class:`imagene.model.SIGMMA`.

    Returns
    -------
    Nothing; adds ``obsm[key_added]`` — (n_obs, n_latent) float32.

    Examples
    --------
    >>> imagene.tl.embed(model, adata, modality="image")
    >>> for scale in ("micro", "meso", "macro"):  # SIGMMA: one key per scale
    ...     imagene.tl.embed(model, adata, modality="image", scale=scale, key_added=f"X_imagene_image_{scale}")
    """
    adata = model.adata if adata is None else adata
    if adata is None:
        raise ValueError("The model was loaded without its training AnnData: pass the AnnData to embed.")
    check_adata(adata)
    if modality == "image":
        ensure_image_features(model, adata)
    z = model.get_latent_representation(adata, modality=modality, **kwargs)
    save_key(adata, "obsm", key_added or f"{KEYS.LATENT_PREFIX}{modality}", np.asarray(z, dtype=np.float32))


def ensure_image_features(model: Any, adata: AnnData, *, show_progress_bar: bool = False, head: bool = False) -> None:
    """Compute ``obsm[model.image_key]`` when missing, with the model's tile settings (``tile_settings_``).

    Models whose image tower reads its own tiles (STAlign, SIGMMA) need the features only for a
    ridge head fitted on them (``head=True``: a ``method='head'`` prediction).

    Tiles are cut from the section images of ``adata`` (``uns['spatial']``, e.g. a slide grid of
    :func:`imagene.pp.spot_grid`) on a light copy and embedded with the training encoder; only
    ``obsm[model.image_key]`` (and its provenance ``uns[model.image_key]``) is written.
    """
    key = getattr(model, "image_key", None)
    head_reads = head and getattr(model, "expression_head_features_key_", None) == key and "features" in getattr(
        model, "expression_head_inputs_", ""
    )
    if key is None or key in adata.obsm or not (getattr(model, "_uses_image_key", True) or head_reads):
        return
    conf = dict(getattr(model, "tile_settings_", None) or {})
    if not conf.get("encoder") or KEYS.SPATIAL not in adata.obsm or "spatial" not in adata.uns:
        raise KeyError(
            f"adata.obsm[{key!r}] not found and cannot be computed here (no spot centres / images, or unknown "
            "encoder). Run `imagene.pp.extract_tiles(adata)` and `imagene.pp.embed_tiles(adata)` with the training "
            "settings first."
        )
    from imagene.pp import embed_tiles, extract_tiles

    logger.info(
        "Computing obsm[%r]: %g µm tiles at %d px embedded with %r (the model's tile settings)",
        key, conf["tile_size_um"], conf["tile_px"], conf["encoder"],
    )
    light = AnnData(obs=adata.obs[[]].copy(), obsm={KEYS.SPATIAL: np.asarray(adata.obsm[KEYS.SPATIAL])})
    light.uns["spatial"] = adata.uns["spatial"]
    lib_cols = [c for c in ("section", "library_id") if c in adata.obs]
    for c in lib_cols:
        light.obs[c] = adata.obs[c].to_numpy()
    extract_tiles(
        light, tile_size_um=conf["tile_size_um"], tile_px=int(conf["tile_px"]), show_progress_bar=show_progress_bar
    )
    embed_tiles(
        light, encoder=conf["encoder"], input_px=conf.get("input_px"), key_added=key,
        show_progress_bar=show_progress_bar,
    )
    save_key(adata, "obsm", key, light.obsm[key])
    save_key(adata, "uns", key, light.uns[key])


def predict_expression(
    model: Any,
    adata: AnnData,
    *,
    genes: Sequence[str] | None = None,
    key_added: str = KEYS.PREDICTED,
    sd_key_added: str | None = KEYS.PREDICTED_SD,
    **kwargs: Any,
) -> AnnData | None:
    """Predict expression from H&E, with its spread, for the model's genes.

    **The gene rule** (the same for every model): predictions always cover the model's genes
    (``model.gene_names``, or ``genes``), in that order, whatever genes the query measured (it
    may have none: the image side never needs counts).

    - When ``adata.var_names`` equal those genes (same genes, same order), the predictions are
      written into ``adata`` (``layers[key_added]``, ``layers[sd_key_added]``) and ``None`` is returned.
    - Otherwise ``adata`` is left as it is and a **new AnnData** is returned: ``obs`` of the
      query, ``var`` = the predicted genes, ``X`` and ``layers[key_added]`` the predictions,
      ``layers[sd_key_added]`` the spread, ``obsm['spatial']`` and ``uns['spatial']`` of the
      query (ready for ``squidpy.pl.spatial_scatter``). A log line says which case applied.
      Use ``out[:, shared_genes]`` to compare with measured genes.

    Predictions are log-normalised expression (``log1p`` of counts per 10k). The spread is the
    weighted standard deviation of the ``k`` retrieved references (retrieval: UMPIRE, SIGMMA,
    STAlign ``method='reference'``) or of 16 Monte-Carlo-dropout passes (STAlign ``method='probe'``,
    AlignST). Models with a reference bank also write ``obs['imagene_reference_similarity']``
    (best cosine similarity of the spot's image embedding to the training spots) and
    ``obs['imagene_ood']`` (below the 1st percentile of the training spots: unlike every training
    spot, do not trust its prediction). Off-tissue grid spots keep their ``obs['imagene_in_tissue']``.

    Parameters
    ----------
    model
        A trained imagene model, also one loaded with ``Model.load(dir)`` alone.
    adata
        Query: spots (or a slide grid from :func:`imagene.pp.spot_grid`) with the model's image input
        in ``obsm``; when ``obsm[model.image_key]`` is missing it is computed from the query's
        images with the model's tile settings (:func:`ensure_image_features`) and written.
    genes
        Genes to predict (default: the model's genes). AlignST predicts any gene with a
        description (e.g. ``genes=query.var_names`` to fill the query's own layer).
    key_added
        Layer of the predictions.
    sd_key_added
        Layer of the spread (``None``: not computed where that saves time).
    **kwargs
        Passed to the model's prediction (e.g. ``k``, ``weighting``, ``method='probe'``).

    Returns
    -------
    ``None`` when the predictions were written into ``adata``; otherwise the new AnnData.

    Examples
    --------
    >>> out = imagene.tl.predict_expression(model, grid)   # a slide grid has no genes: a new AnnData
    >>> out.layers["imagene_predicted"].shape == (grid.n_obs, len(model.gene_names))
    """
    check_adata(adata)
    genes = pd.Index([str(g) for g in (model.gene_names if genes is None else genes)])
    if len(genes) == 0:
        raise ValueError("The model has no genes to predict; pass `genes=`.")
    if genes.has_duplicates:
        raise ValueError("genes holds duplicates; pass each symbol once.")
    ensure_image_features(model, adata, head=kwargs.get("method") == "head")
    if hasattr(model, "_predict_full"):
        out = model._predict_full(adata, list(genes), **kwargs)
    else:  # a model outside imagene with the predict_expression(adata, gene_list=...) convention
        out = {"pred": model.predict_expression(adata, gene_list=list(genes), return_numpy=True, **kwargs)}
    pred = np.asarray(out["pred"], dtype=np.float32)
    sd = out.get("sd")
    similarity = out.get("similarity")
    if similarity is None and getattr(model, "reference_latent_", None) is not None and hasattr(
        model, "reference_similarity"
    ):
        similarity = model.reference_similarity(adata)
    if adata.var_names.equals(genes):
        target = adata
        logger.info("Predicted the %d genes of adata (its var_names are the model's genes)", len(genes))
    else:
        target = AnnData(
            X=pred.copy(), obs=adata.obs.copy(), var=pd.DataFrame(index=genes),
            obsm={k: np.asarray(adata.obsm[k]) for k in (KEYS.SPATIAL,) if k in adata.obsm},
        )
        if "spatial" in adata.uns:
            target.uns["spatial"] = adata.uns["spatial"]
        logger.info(
            "adata's genes (%d) are not the %d predicted genes: returning a new AnnData (obs of adata, var = the "
            "predicted genes) with layers[%r]; adata is unchanged",
            adata.n_vars, len(genes), key_added,
        )
    save_key(target, "layers", key_added, pred)
    if sd is not None and sd_key_added is not None:
        save_key(target, "layers", sd_key_added, np.asarray(sd, dtype=np.float32))
    if similarity is not None:
        save_key(target, "obs", KEYS.REFERENCE_SIMILARITY, np.asarray(similarity, dtype=np.float32))
        threshold = getattr(model, "ood_similarity_threshold_", None)
        if threshold is not None:
            ood = np.asarray(similarity) < float(threshold)
            save_key(target, "obs", KEYS.OOD, ood)
            if ood.any():
                logger.info(
                    "%d of %d spots are unlike every training spot (obs[%r])", int(ood.sum()), len(ood), KEYS.OOD
                )
    return None if target is adata else target
