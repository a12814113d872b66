"""Cross-modal retrieval with a trained model: image → expression and expression → image."""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from imagene._utils import check_adata
from imagene.metrics import recall_at_k

logger = logging.getLogger("imagene")


def retrieve(
    model: Any,
    adata: AnnData | None = None,
    *,
    k_percents: tuple[float, ...] = (5, 10, 15),
    top_n: int = 0,
    **latent_kwargs: Any,
) -> dict[str, Any]:
    """Score (and optionally list) cross-modal retrieval among the observations of ``adata``.

    Every observation's image embedding is the query and all gene embeddings the candidates
    (image→gene), and the reverse (gene→image); Recall@k % is the fraction of queries whose own
    partner ranks in the top ``k`` % (:func:`imagene.metrics.recall_at_k`; chance is ``k`` %).

    Parameters
    ----------
    model
        A trained imagene model with ``get_latent_representation(adata, modality=...)``.
    adata
        Observations with image input and counts (the model's training AnnData when ``None``;
        for an honest score use held-out sections).
    k_percents
        Cut-offs in percent.
    top_n
        Also return, for each observation, the ``top_n`` best gene-side matches of its image
        (``obs_names``) and their cosine similarities.
    **latent_kwargs
        Passed to ``get_latent_representation`` (e.g. ``scale='macro'`` for SIGMMA).

    Returns
    -------
    ``{"recall": DataFrame (rows k %, columns 'image_to_gene', 'gene_to_image', 'mean'),
    "matches": DataFrame of the top matches (only with ``top_n > 0``)}``.

    Examples
    --------
    >>> res = imagene.tl.retrieve(model, held_out, scale="all")
    >>> res["recall"].loc[5, "mean"]
    """
    adata = model.adata if adata is None else adata
    check_adata(adata)
    if not k_percents:
        raise ValueError("k_percents is empty; pass cut-offs in percent, e.g. (5, 10, 15).")
    if isinstance(top_n, bool) or not isinstance(top_n, (int, np.integer)) or top_n < 0:
        raise ValueError(f"top_n must be a non-negative integer; got {top_n!r}.")
    z_i = np.asarray(model.get_latent_representation(adata, modality="image", **latent_kwargs), dtype=np.float64)
    z_g = np.asarray(model.get_latent_representation(adata, modality="gene", **latent_kwargs), dtype=np.float64)
    rows = {}
    for k in k_percents:
        i2g = recall_at_k(z_i, z_g, k_percent=k)
        g2i = recall_at_k(z_g, z_i, k_percent=k)
        rows[k] = {"image_to_gene": i2g, "gene_to_image": g2i, "mean": 0.5 * (i2g + g2i)}
    out: dict[str, Any] = {"recall": pd.DataFrame.from_dict(rows, orient="index").rename_axis("k_percent")}
    if top_n:
        n = int(min(top_n, adata.n_obs))
        a = z_i / np.maximum(np.linalg.norm(z_i, axis=1, keepdims=True), 1e-12)
        b = z_g / np.maximum(np.linalg.norm(z_g, axis=1, keepdims=True), 1e-12)
        names = np.asarray(adata.obs_names)
        recs = []
        for start in range(0, len(a), 1024):
            sim = a[start : start + 1024] @ b.T
            top = np.argsort(-sim, axis=1)[:, :n]
            for r, cols in enumerate(top):
                for rank, c in enumerate(cols):
                    recs.append((names[start + r], rank + 1, names[c], float(sim[r, c])))
        out["matches"] = pd.DataFrame(recs, columns=["query", "rank", "match", "similarity"])
    logger.info("retrieve: Recall@%s%% = %.3f (mean of both directions)", k_percents[0], rows[k_percents[0]]["mean"])
    return out
