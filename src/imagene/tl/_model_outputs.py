"""Write a trained model's latents and predictions into an AnnData."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import check_adata, save_key, warn

logger = logging.getLogger("imagene")


def embed(model: Any, adata: AnnData | None = None, *, modality: str = "joint", key_added: str | None = None) -> None:
    """Write a model's latent representation to ``obsm``.

    Parameters
    ----------
    model
        A trained imagene model.
    adata
        AnnData to embed (the model's training AnnData when ``None``).
    modality
        ``'image'``, ``'gene'`` or ``'joint'`` (models may offer more, e.g. ``'niche'``).
    key_added
        ``obsm`` key; defaults to ``f"X_imagene_{modality}"``.

    Returns
    -------
    Nothing; adds ``obsm[key_added]`` — (n_obs, n_latent) float32.
    """
    adata = model.adata if adata is None else adata
    check_adata(adata)
    z = model.get_latent_representation(adata, modality=modality)
    save_key(adata, "obsm", key_added or f"{KEYS.LATENT_PREFIX}{modality}", np.asarray(z, dtype=np.float32))


def predict_expression(
    model: Any, adata: AnnData, *, key_added: str = KEYS.PREDICTED, **kwargs: Any
) -> AnnData | None:
    """Predict expression from H&E and write it as a layer aligned with ``adata.var_names``.

    Predictions are log-normalised expression (``log1p`` of counts per 10k). Genes of ``adata``
    that the model knows are predicted; if some are unknown to the model, a warning names them
    and a NEW AnnData holding only the predictable genes is returned (the layer is never
    padded with NaN).

    Parameters
    ----------
    model
        A trained imagene model with ``predict_expression``.
    adata
        Query AnnData with the model's image input in ``obsm``; its ``var_names`` choose the genes
        (for a query without measured genes, give it
        the model's genes as ``var``).
    key_added
        Layer written.
    **kwargs
        Passed to ``model.predict_expression`` (e.g. ``k``, ``weighting``).

    Returns
    -------
    ``None`` when every gene of ``adata`` was predicted (``adata.layers[key_added]`` added, float32);
    otherwise a new AnnData over the predictable genes carrying the layer.
    """
    check_adata(adata)
    known = model.gene_names
    pos = known.get_indexer(adata.var_names)
    ok = pos >= 0
    if not ok.any():
        raise ValueError(
            "None of adata's genes is known to the model. Use an AnnData whose var_names are the model's genes "
            "(`model.gene_names`)."
        )
    genes = adata.var_names[ok]
    pred = model.predict_expression(adata, gene_list=list(genes), return_numpy=True, **kwargs).astype(np.float32)
    if ok.all():
        save_key(adata, "layers", key_added, pred)
        return None
    warn(
        f"{int((~ok).sum())} of adata's {adata.n_vars} genes are unknown to the model (e.g. "
        f"{adata.var_names[~ok][:3].tolist()}); returning a new AnnData with the {int(ok.sum())} predictable genes."
    )
    out = adata[:, ok].copy()
    save_key(out, "layers", key_added, pred)
    return out
