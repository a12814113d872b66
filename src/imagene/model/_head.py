"""The ridge expression head of a trained model: a reduced-rank ridge from its image input and latent to every gene."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from imagene._constants import KEYS
from imagene._utils import log_normalize
from imagene.metrics import mean_pearson

logger = logging.getLogger("imagene")

#: what the head may read: the model's image input (``obsm[image_key]``), its image latent, or both
HEAD_INPUTS = ("features", "latent", "features+latent")


def ridge_pipeline(n_obs: int, n_features: int, *, n_components: int = 256, seed: int = 0):
    """StandardScaler → PCA(``n_components``) → RidgeCV (13 penalties from 0.1 to 1e5): the HEST probe."""
    from sklearn.decomposition import PCA
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    n_comp = int(min(n_components, n_obs - 1, n_features))
    return make_pipeline(
        StandardScaler(), PCA(n_components=n_comp, random_state=seed), RidgeCV(alphas=np.logspace(-1, 5, 13))
    )


def center_by_section(x: np.ndarray, sections: np.ndarray | None, use: np.ndarray | None = None) -> np.ndarray:
    """``x`` minus the mean row of its section (one section when ``sections`` is ``None``).

    ``use``: boolean rows the means are taken over (e.g. the in-tissue spots of a slide grid);
    a section with none of them uses all its rows.
    """
    x = np.array(x, dtype=np.float64, copy=True)
    groups = np.zeros(len(x), dtype=int) if sections is None else pd.factorize(np.asarray(sections))[0]
    for g in np.unique(groups):
        rows = groups == g
        ref = rows & use if use is not None and (rows & use).any() else rows
        x[rows] -= x[ref].mean(0)
    return x


class RidgeHead:
    """Reduced-rank ridge: features → (optionally section-centred) → ridge pipeline → top-``rank`` gene PCs → genes.

    ``rank=0`` regresses every gene directly. Centring subtracts each section's mean feature
    (the section's own image only: a test-time normalisation that needs no expression).
    Predictions are clipped at 0 (the targets are ``log1p`` CP10k).

    Parameters
    ----------
    rank
        Principal components of the targets regressed (``0``: every target column).
    center
        Subtract each section's mean feature before the pipeline (in ``fit`` and ``predict``).
    seed
        Seed of the PCA solvers.

    Examples
    --------
    >>> head = imagene.model.RidgeHead(16, True).fit(x_train, y_train, sections_train)
    >>> pred = head.predict(x_test, sections_test)
    """

    def __init__(self, rank: int, center: bool, seed: int = 0) -> None:
        self.rank, self.center, self.seed = int(rank), bool(center), int(seed)

    def fit(self, x: np.ndarray, y: np.ndarray, sections: np.ndarray | None) -> RidgeHead:
        """Fit on rows ``x`` (n, d), targets ``y`` (n, genes) and their ``sections`` (n,) or ``None``; returns self."""
        from sklearn.decomposition import PCA

        x = center_by_section(x, sections) if self.center else np.asarray(x, dtype=np.float64)
        rank = min(self.rank, y.shape[1], x.shape[0] - 1)
        self.gene_pca_ = PCA(rank, random_state=self.seed).fit(y) if rank > 0 else None
        target = self.gene_pca_.transform(y) if self.gene_pca_ is not None else y
        self.pipeline_ = ridge_pipeline(*x.shape, seed=self.seed).fit(x, target)
        return self

    def predict(self, x: np.ndarray, sections: np.ndarray | None, use: np.ndarray | None = None) -> np.ndarray:
        """Predictions (n, genes) for rows ``x``, centred per ``sections`` (means over rows ``use``) with ``center``."""
        x = center_by_section(x, sections, use) if self.center else np.asarray(x, dtype=np.float64)
        out = self.pipeline_.predict(x)
        out = self.gene_pca_.inverse_transform(out) if self.gene_pca_ is not None else out
        return np.clip(out, 0, None)  # log1p CP10k is never negative


def select_ridge_head(
    x: np.ndarray,
    y: np.ndarray,
    sections: np.ndarray | None,
    *,
    grid: Sequence[tuple[int, bool]] = tuple((r, c) for r in (0, 8, 16, 32) for c in (False, True)),
    n_genes: int = 50,
    seed: int = 0,
) -> tuple[RidgeHead, pd.DataFrame]:
    """Choose ``(rank, center)`` of a :class:`RidgeHead` by leave-one-section-out, then refit it on every row.

    The score is the mean Pearson r over the ``n_genes`` most variable columns of ``y``, averaged
    over the held-out sections. With fewer than two sections nothing is validated and
    ``rank=16`` with centring is used.

    Parameters
    ----------
    x, y
        Features (n, d) and targets (n, genes), e.g. ``log1p`` CP10k.
    sections
        Section of each row (n,), or ``None`` for one section.
    grid
        Candidate ``(rank, center)`` settings.
    n_genes
        Most variable target columns scored.
    seed
        Seed of the PCA solvers.

    Returns
    -------
    The refitted head and the validation table (``rank``, ``center``, ``pcc``; best first; empty
    with one section).

    Examples
    --------
    >>> head, table = imagene.model.select_ridge_head(x, y, adata.obs["section"].to_numpy())
    """
    names = np.unique(sections) if sections is not None else np.array([])
    if len(names) < 2:
        logger.info("One training section: the expression head uses rank=16 with centring "
                    "(nothing to validate on).")
        return RidgeHead(16, True, seed).fit(x, y, sections), pd.DataFrame(columns=["rank", "center", "pcc"])
    hvg = np.argsort(-y.var(0))[: int(n_genes)]
    rows = []
    for rank, cen in grid:
        scores = []
        for held in names:
            fit_rows = sections != held
            head = RidgeHead(rank, cen, seed).fit(x[fit_rows], y[fit_rows], sections[fit_rows])
            pred = head.predict(x[~fit_rows], sections[~fit_rows])
            scores.append(mean_pearson(y[~fit_rows][:, hvg], pred[:, hvg]))
        rows.append({"rank": int(rank), "center": bool(cen), "pcc": float(np.mean(scores))})
    table = pd.DataFrame(rows).sort_values("pcc", ascending=False, kind="stable").reset_index(drop=True)
    best = RidgeHead(int(table.loc[0, "rank"]), bool(table.loc[0, "center"]), seed)
    return best.fit(x, y, sections), table


class ExpressionHeadMixin:
    """Fit and use a ridge expression head on a trained alignment model (mixed into :class:`AlignmentMixin`).

    Needs from the model: ``adata``, ``image_key``, ``library_key``, ``get_latent_representation``, ``_gene_input``,
    ``_gene_columns``, ``_query``, ``_check_trained`` and ``_format_prediction``.
    """

    def fit_expression_head(
        self,
        *,
        inputs: str = "features+latent",
        features_key: str | None = None,
        ranks: Sequence[int] = (0, 8, 16, 32),
        center: Sequence[bool] = (False, True),
        n_genes: int = 50,
        batch_size: int = 512,
    ) -> pd.DataFrame:
        """Fit a ridge head from the image side to every gene, its settings chosen on held-out training sections.

        Query-reference prediction averages the expression of the most similar training spots;
        on her2st and the context matrix of :func:`imagene.pp.context_matrix` a direct regression
        predicts held-out sections better (``docs/benchmark.md``). The head is a ridge (the
        StandardScaler → PCA(256) → RidgeCV pipeline of the HEST probe) from ``inputs`` to the
        ``rank`` leading principal components of the training spots' ``log1p`` CP10k (``rank=0``:
        every gene directly), optionally after subtracting each section's mean input (the section's
        own image only, no expression: the query is centred the same way, per section of
        ``obs[library_key]``, over its in-tissue spots on a slide grid of :func:`imagene.pp.spot_grid`).
        ``rank`` and centring are chosen by leave-one-section-out over the
        training sections (mean Pearson r of the ``n_genes`` most variable training genes); with
        one training section, ``rank=16`` with centring is used. The head is refitted on all
        training spots, saved with the model, and used by ``predict_expression(method='head')``.

        The latent was trained on every training section, the held-out ones of this selection
        included: with ``inputs`` holding ``'latent'`` the validation scores favour the latent a
        little, and only ``rank`` and centring are chosen from them.

        Parameters
        ----------
        inputs
            ``'features'`` (``obsm[features_key]``), ``'latent'`` (the model's image latent) or
            ``'features+latent'`` (both; the latent scaled to the features' width).
        features_key
            ``obsm`` key of the features (``None``: the model's image input, ``obsm[image_key]``):
            e.g. the context matrix of :func:`imagene.pp.context_matrix`, the way every model, also
            one whose image tower reads its own tiles (STAlign, SIGMMA), takes the context for
            expression. Queries need the same key.
        ranks
            Candidate numbers of gene principal components (``0``: no reduction).
        center
            Candidate centring settings.
        n_genes
            Most variable training genes scored in the selection.
        batch_size
            Spots per step of the latent.

        Returns
        -------
        The validation table: one row per setting with ``rank``, ``center`` and ``pcc`` (mean over
        held-out training sections), sorted best first; empty with one training section.

        Examples
        --------
        >>> model.train()
        >>> model.fit_expression_head()
        >>> pred = model.predict_expression(query, method="head")
        """
        self._check_trained()
        if inputs not in HEAD_INPUTS:
            raise ValueError(f"inputs must be one of {HEAD_INPUTS}; got {inputs!r}.")
        grid = [(int(r), bool(c)) for r in ranks for c in center]
        if not grid or any(r < 0 for r, _ in grid):
            raise ValueError(f"ranks must hold integers >= 0 and center booleans; got {ranks!r}, {center!r}.")
        if "features" in inputs and (features_key or self.image_key) is None:
            raise ValueError(f"{type(self).__name__} was set up without image features (`image_key=None`): pass the "
                             "obsm key of features as `features_key=`, or `inputs='latent'`.")
        self.expression_head_inputs_ = inputs
        self.expression_head_features_key_ = features_key or self.image_key
        x = self._head_inputs(self.adata, batch_size)
        y = log_normalize(self._gene_input(self.adata))
        head, table = select_ridge_head(x, y, self._head_sections(self.adata), grid=grid, n_genes=n_genes)
        self.expression_head_ = head
        self.expression_head_settings_ = {"inputs": inputs, "features_key": self.expression_head_features_key_,
                                          "rank": head.rank, "center": head.center}
        logger.info("Fitted the expression head on %s: rank=%d, center=%s", inputs, head.rank, head.center)
        return table

    def _head_sections(self, adata: AnnData) -> np.ndarray | None:
        key = self.library_key
        return adata.obs[key].astype(str).to_numpy() if key is not None and key in adata.obs else None

    def _head_inputs(self, adata: AnnData, batch_size: int) -> np.ndarray:
        inputs = getattr(self, "expression_head_inputs_", "features+latent")
        blocks = []
        if "features" in inputs:
            key = getattr(self, "expression_head_features_key_", None) or self.image_key
            if key not in adata.obsm:
                raise KeyError(f"adata.obsm[{key!r}] not found: the expression head reads these features. Compute "
                               "them for the query as for the training data (e.g. `imagene.pp.context_matrix`).")
            blocks.append(np.asarray(adata.obsm[key], dtype=np.float64))
        if "latent" in inputs:
            z = np.asarray(self.get_latent_representation(adata, None, batch_size, modality="image"), dtype=np.float64)
            width = blocks[0].shape[1] if blocks else z.shape[1]
            blocks.append(z * np.sqrt(width / z.shape[1]))
        return np.hstack(blocks)

    def _predict_head(self, adata: AnnData, indices: Sequence[int] | None, cols: np.ndarray,
                      batch_size: int = 512) -> np.ndarray:
        """Head predictions of every spot of ``adata`` (centred per section), rows ``indices`` of them."""
        self._check_trained()
        head = getattr(self, "expression_head_", None)
        if head is None:
            raise RuntimeError("The model has no expression head; call `model.fit_expression_head()` after training.")
        use = adata.obs[KEYS.IN_TISSUE].to_numpy(dtype=bool) if KEYS.IN_TISSUE in adata.obs else None
        pred = head.predict(self._head_inputs(adata, batch_size), self._head_sections(adata), use)[:, cols]
        pred = pred if indices is None else pred[np.asarray(indices)]
        return pred.astype(np.float32)

    def _predict_full(self, adata: AnnData, genes: Sequence[str], **kwargs: Any) -> dict[str, np.ndarray | None]:
        if kwargs.get("method") != "head":
            return super()._predict_full(adata, genes, **kwargs)
        cols = self._gene_columns(genes)
        return {"pred": self._predict_head(adata, None, cols, int(kwargs.get("batch_size", 512))), "sd": None,
                "similarity": None}
