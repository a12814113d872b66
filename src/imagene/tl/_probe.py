"""Linear probing of spot embeddings against reference labels (UMPIRE's spot-classification task)."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from imagene._constants import KEYS
from imagene._settings import settings
from imagene._utils import check_adata, check_obsm
from imagene._validate import renamed_kwarg

logger = logging.getLogger("imagene")

SPLITS = ("auto", "section", "spatial_blocks")


def _spatial_blocks(coords: np.ndarray, n_blocks: int, seed: int) -> np.ndarray:
    """Contiguous spatial blocks: k-means on the spot coordinates (compact regions, not random spots)."""
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=n_blocks, n_init=10, random_state=seed).fit_predict(coords.astype(np.float64))


def linear_probe(
    adata: AnnData,
    obsm_key: str,
    label_key: str,
    *,
    library_key: str | None = None,
    split: str = "auto",
    n_blocks: int = 5,
    spatial_key: str = KEYS.SPATIAL,
    ignore_labels: Sequence[str] = ("undetermined",),
    C: float = 1.0,
    max_iter: int = 2000,
    seed: int | None = None,
    section_key: str | None = None,
) -> pd.DataFrame:
    """Linear probe of an embedding: logistic regression on held-out sections or spatial blocks.

    For each fold a :class:`~sklearn.preprocessing.StandardScaler` and a
    :class:`~sklearn.linear_model.LogisticRegression` are fitted on the training spots only and
    scored on the held-out spots by balanced accuracy and weighted F1. Folds are never random
    spots (neighbouring spots share tissue, so a random split is optimistic):

    - ``split='section'``: leave one labelled section out (needs 2 or more labelled sections).
    - ``split='spatial_blocks'``: inside each section, the spots are cut into ``n_blocks``
      contiguous spatial blocks (k-means on ``obsm[spatial_key]``), and each block is held out in
      turn. Use it when only one section has labels (e.g. her2st A1); blocks still border their
      training neighbours along their edges, so scores are less strict than across sections.
    - ``split='auto'``: ``'section'`` with 2+ labelled sections, otherwise ``'spatial_blocks'``.

    Parameters
    ----------
    adata
        AnnData with the embedding in ``obsm[obsm_key]`` and labels in ``obs[label_key]``.
    obsm_key
        Embedding to probe (e.g. ``'X_imagene_image'`` or frozen features ``'X_he_efficientnet_lite0'``).
    label_key
        ``obs`` column of reference labels (e.g. pathologist regions).
    library_key
        ``obs`` column of sections (default ``'section'``) (a single section is assumed when it is missing).
    split
        ``'auto'``, ``'section'`` or ``'spatial_blocks'``.
    n_blocks
        Spatial blocks per section for ``'spatial_blocks'``.
    spatial_key
        ``obsm`` key of spot coordinates for ``'spatial_blocks'``.
    ignore_labels
        Labels left out of training and scoring (missing labels are always left out).
    C
        Inverse regularisation strength of the logistic regression.
    max_iter
        Iterations of the solver.
    seed
        Seed of the block assignment (default: ``imagene.settings.seed`` or 0).
    section_key
        Old name of ``library_key`` (deprecated).

    Returns
    -------
    One row per fold: ``fold``, ``split`` (a sentence naming how the fold was held out),
    ``n_train``, ``n_test``, ``n_classes_train``, ``balanced_accuracy``, ``f1_weighted``. Nothing
    is written to ``adata``.

    Examples
    --------
    >>> res = imagene.tl.linear_probe(a1, "X_imagene_image", "label", split="spatial_blocks")
    >>> res[["balanced_accuracy", "f1_weighted"]].mean()
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score, f1_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    library_key = renamed_kwarg("library_key", library_key, "section_key", section_key, where="imagene.tl.linear_probe")
    library_key = KEYS.SECTION if library_key is None else library_key
    check_adata(adata)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}.")
    z = np.asarray(check_obsm(adata, obsm_key, "Write the embedding first (e.g. `imagene.tl.embed(model, adata)`)."))
    if z.ndim != 2 or z.shape[0] != adata.n_obs:
        raise ValueError(f"adata.obsm[{obsm_key!r}] must be (n_obs, d); got shape {z.shape}.")
    if not np.isfinite(z).all():
        raise ValueError(f"adata.obsm[{obsm_key!r}] contains NaN or inf; recompute the embedding.")
    if label_key not in adata.obs:
        raise KeyError(f"adata.obs[{label_key!r}] not found. Pass the obs column of reference labels as `label_key=`.")
    labels = adata.obs[label_key]
    usable = (labels.notna() & ~labels.astype(str).isin(list(ignore_labels))).to_numpy()
    y = labels.astype(str).to_numpy()
    if library_key in adata.obs:
        sections = adata.obs[library_key].astype(str).to_numpy()
    else:
        sections = np.full(adata.n_obs, "section")
    labelled = [s for s in pd.unique(sections) if np.unique(y[usable & (sections == s)]).size >= 2]
    if not labelled:
        raise ValueError(
            f"No section has 2 or more classes in adata.obs[{label_key!r}] (ignoring {list(ignore_labels)}); "
            "a linear probe needs labelled spots of several classes."
        )
    if split == "auto":
        split = "section" if len(labelled) >= 2 else "spatial_blocks"
        logger.info("linear_probe: split=%r (%d labelled section(s))", split, len(labelled))
    seed = (settings.seed if settings.seed is not None else 0) if seed is None else int(seed)

    folds: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    if split == "section":
        if len(labelled) < 2:
            raise ValueError(
                f"split='section' needs 2 or more labelled sections; got {labelled}. Use split='spatial_blocks' to hold "
                "out contiguous spatial blocks inside one section."
            )
        for s in labelled:
            test = usable & (sections == s)
            train = usable & np.isin(sections, labelled) & (sections != s)
            folds.append((s, f"section {s} held out (trained on {len(labelled) - 1} other sections)", train, test))
    else:
        if spatial_key not in adata.obsm:
            raise KeyError(
                f"adata.obsm[{spatial_key!r}] not found; split='spatial_blocks' needs spot coordinates. Pass their obsm "
                "key as `spatial_key=`."
            )
        coords = np.asarray(adata.obsm[spatial_key])[:, :2]
        if n_blocks < 2:
            raise ValueError(f"n_blocks must be >= 2; got {n_blocks}.")
        for s in labelled:
            in_s = np.flatnonzero(usable & (sections == s))
            if len(in_s) < 2 * n_blocks:
                raise ValueError(f"Section {s!r} has {len(in_s)} labelled spots, too few for {n_blocks} blocks.")
            blocks = _spatial_blocks(coords[in_s], n_blocks, seed)
            for b in range(n_blocks):
                test = np.zeros(adata.n_obs, bool)
                test[in_s[blocks == b]] = True
                train = np.zeros(adata.n_obs, bool)
                train[in_s[blocks != b]] = True
                folds.append(
                    (f"{s}/block{b}", f"spatial block {b + 1} of {n_blocks} of section {s} held out "
                     "(contiguous k-means block of spot coordinates; not a random spot split)", train, test)
                )
    rows: list[dict[str, Any]] = []
    for name, how, train, test in folds:
        classes = np.unique(y[train])
        if classes.size < 2:
            logger.info("linear_probe: fold %s skipped (one class in training)", name)
            continue
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=max_iter))
        clf.fit(z[train], y[train])
        pred = clf.predict(z[test])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # classes predicted but absent from this block
            bacc = balanced_accuracy_score(y[test], pred)
        rows.append({
            "fold": name,
            "split": how,
            "n_train": int(train.sum()),
            "n_test": int(test.sum()),
            "n_classes_train": int(classes.size),
            "balanced_accuracy": float(bacc),
            "f1_weighted": float(f1_score(y[test], pred, average="weighted", zero_division=0)),
        })
    if not rows:
        raise ValueError("Every fold had a single class in training; use fewer blocks or more labelled sections.")
    return pd.DataFrame(rows)
