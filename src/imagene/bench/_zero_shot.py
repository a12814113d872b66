"""Zero-shot evaluation of unseen genes (ALIGN-ST protocol) on held-out sections."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from imagene._settings import settings
from imagene._utils import check_adata, get_counts, log_normalize, progress

logger = logging.getLogger("imagene")

ZERO_SHOT_METHODS = ("alignst", "ridge_supervised", "nearest_seen_gene")


def zero_shot(
    adata: AnnData,
    *,
    library_key: str | None = None,
    layer: str | None = "counts",
    image_key: str = "X_he_efficientnet_lite0",
    test_sections: Sequence[str] | None = None,
    n_unseen: int = 250,
    n_seen: int = 256,
    n_top: int = 50,
    methods: Sequence[str] = ZERO_SHOT_METHODS,
    max_epochs: int = 30,
    model_kwargs: dict[str, Any] | None = None,
    train_kwargs: dict[str, Any] | None = None,
    show_progress_bar: bool = True,
    section_key: str | None = None,
) -> pd.DataFrame:
    """Leave-one-section-out evaluation of expression prediction for genes never seen in training.

    The protocol of ALIGN-ST (Zhou et al., MICCAI 2025) on the harness' section folds
    (the same folds as :func:`imagene.bench.run` with ``split='section'``): per fold, on the
    TRAINING sections only, the ``n_unseen`` most expressed genes (mean log1p CP10k, among genes
    with a description) are held out as unseen and the next ``n_seen`` are the seen genes. Methods:

    - ``'alignst'``: :class:`imagene.model.AlignST` trained on the seen genes, predicting the unseen
      ones from their descriptions (zero-shot).
    - ``'ridge_supervised'``: the HEST ridge probe (:meth:`imagene.bench.RidgeProbe.fit_predict`) trained WITH
      the unseen genes' expression (the supervised reference, not zero-shot).
    - ``'nearest_seen_gene'``: gene-agnostic baseline: each unseen gene gets the ridge prediction of
      its nearest seen gene in description space (cosine of all-MiniLM-L6-v2 sentence embeddings).

    Scores on the held-out section, on the unseen genes: PCC@M (mean per-gene Pearson r), PCC@H
    (mean of the ``n_top`` best-predicted genes; the paper's definition, which ranks genes on the
    test scores by construction) and MSE on log1p CP10k.

    Parameters
    ----------
    adata
        Several sections with raw counts, frozen tile features, spot centres (and images or
        ``obsm['imagene_nuclei']`` for nuclei maps).
    library_key
        ``obs`` column of sections (default ``'section'``).
    layer
        Layer of raw counts.
    image_key
        ``obsm`` key of frozen tile features.
    test_sections
        Sections to hold out in turn (default: every section).
    n_unseen
        Unseen genes per fold.
    n_seen
        Seen (training) genes per fold.
    n_top
        Genes of PCC@H.
    methods
        Subset of ``('alignst', 'ridge_supervised', 'nearest_seen_gene')``.
    max_epochs
        AlignST epochs.
    model_kwargs, train_kwargs
        Passed to :class:`imagene.model.AlignST` and its ``train``.
    show_progress_bar
        Show a progress bar over folds.
    section_key
        Old name of ``library_key`` (FutureWarning).

    Returns
    -------
    One row per fold and method: ``fold``, ``method``, ``pcc_m``, ``pcc_h``, ``mse``, ``n_genes``,
    ``n_undefined`` (genes with constant measured or predicted values), ``seconds``.

    Examples
    --------
    >>> res = imagene.bench.zero_shot(adata, library_key="section", max_epochs=30)
    >>> res.groupby("method")[["pcc_m", "pcc_h", "mse"]].mean()
    """
    from imagene.bench._baselines import RidgeProbe
    from imagene.bench._runner import _check_image_key
    from imagene.bench._tasks import RunSpec, ZeroShotGenesTask
    from imagene.datasets import gene_descriptions
    from imagene.model import AlignST

    from imagene._validate import renamed_kwarg

    check_adata(adata)
    library_key = renamed_kwarg("library_key", library_key, "section_key", section_key,
                                where="imagene.bench.zero_shot")
    library_key = "section" if library_key is None else library_key
    unknown = set(methods) - set(ZERO_SHOT_METHODS)
    if unknown:
        raise ValueError(f"Unknown methods {sorted(unknown)}; choose from {list(ZERO_SHOT_METHODS)}.")
    if library_key not in adata.obs:
        raise KeyError(f"adata.obs[{library_key!r}] not found; pass the obs column of sections as `library_key=`.")
    image_key = _check_image_key(adata, image_key)  # the runner's guard: frozen features, not a fit over all spots
    counts = get_counts(adata, layer)
    task = ZeroShotGenesTask(n_unseen=n_unseen, n_seen=n_seen, n_top=n_top)
    spec = RunSpec(library_key=library_key, split="section", patient_key="patient", label_key="label",
                   ignore_labels=(), n_spot_folds=5, test_sections=test_sections)
    folds = [(f.name, ~f.train) for f in task.folds(adata, spec, seed=0)]
    described = gene_descriptions(list(adata.var_names))
    has_text = adata.var_names.isin(described.index)
    feats = np.asarray(adata.obsm[image_key], dtype=np.float32)
    rows = []
    for fold, test in progress(folds, total=len(folds), desc="zero-shot folds", show=show_progress_bar):
        train_idx, test_idx = np.flatnonzero(~test), np.flatnonzero(test)
        y_train = log_normalize(counts[train_idx])
        y_test = log_normalize(counts[test_idx])
        unseen_idx, seen_idx = task.choose_genes(y_train, has_text)  # training sections only
        unseen = list(adata.var_names[unseen_idx])
        seen = list(adata.var_names[seen_idx])
        y_true = y_test[:, unseen_idx]
        logger.info("Fold %s: %d seen, %d unseen genes", fold, len(seen), len(unseen))
        if "alignst" in methods:
            t = time.perf_counter()
            train = adata[train_idx].copy()
            AlignST.setup_anndata(train, layer=layer, image_key=image_key, library_key=library_key)
            model = AlignST(train, **(model_kwargs or {}))
            model.train(max_epochs=max_epochs, seen_genes=seen, unseen_genes=unseen, **(train_kwargs or {}))
            query = adata[test_idx].copy()
            pred = model.predict_expression(query, gene_list=unseen, return_numpy=True)
            rows.append({"fold": fold, "method": "alignst", **task.scores(y_true, pred),
                         "seconds": time.perf_counter() - t})
        if "ridge_supervised" in methods:
            t = time.perf_counter()
            pred = RidgeProbe().fit_predict(feats[train_idx], y_train[:, unseen_idx], feats[test_idx],
                                            seed=settings.seed or 0)
            rows.append({"fold": fold, "method": "ridge_supervised", **task.scores(y_true, pred),
                         "seconds": time.perf_counter() - t})
        if "nearest_seen_gene" in methods:
            from imagene.nn import get_text_encoder

            t = time.perf_counter()
            enc = get_text_encoder()
            e_unseen = enc.encode(list(described[unseen]))
            e_seen = enc.encode(list(described[seen]))
            nearest = np.argmax(e_unseen @ e_seen.T, axis=1)
            pred_seen = RidgeProbe().fit_predict(feats[train_idx], y_train[:, seen_idx], feats[test_idx],
                                                 seed=settings.seed or 0)
            pred = pred_seen[:, nearest]
            rows.append({"fold": fold, "method": "nearest_seen_gene", **task.scores(y_true, pred),
                         "seconds": time.perf_counter() - t})
    return pd.DataFrame(rows)
