"""The reference bank every alignment model predicts from: query image embeddings matched to the
training spots' gene embeddings (UMPIRE / BLEEP-style query-reference prediction)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from imagene._utils import check_adata
from imagene._validate import check_unique_obs_names


class ReferenceBankMixin:
    """The reference bank of a trained alignment model and prediction from it (mixed into :class:`AlignmentMixin`).

    Needs from the model: ``_embed``, ``_gene_input``, ``_query``, ``_check_trained``,
    ``get_latent_representation``, ``gene_names`` and a module with ``logit_scale``.
    """

    def _format_prediction(self, adata, indices, cols, pred, sd, return_numpy):
        return format_prediction(self, adata, indices, cols, pred, sd, return_numpy)
    def _build_reference(self, batch_size: int = 512) -> None:
        """Store the training spots' gene embeddings and log-normalised expression (saved with the model)."""
        self.reference_latent_ = self._embed(self.adata, "gene", None, batch_size).astype(np.float32)
        self._set_reference_counts(self._gene_input(self.adata))
        self._store_similarity_threshold(batch_size)

    def _set_reference_counts(self, counts: sp.spmatrix) -> None:
        """Store the reference spots' counts compactly (saved with the model; the expression derives from them)."""
        self.reference_counts_ = compact_counts(counts)
        self._reference_expression = None

    @property
    def reference_expression(self) -> sp.csr_matrix | None:
        """Log-normalised expression (log1p CP10k) of the reference spots, (n_reference, n_genes) CSR."""
        if getattr(self, "_reference_expression", None) is None:
            stored = getattr(self, "reference_counts_", None)
            if stored is None:  # a model saved before the compact bank
                return self.__dict__.get("reference_expression_")
            self._reference_expression = log_normalize_sparse(expand_counts(stored))
        return self._reference_expression

    def _store_similarity_threshold(self, batch_size: int = 512, *, exclude_self: bool = False) -> None:
        """1st percentile of the training spots' best image-to-bank similarity (saved; the OOD threshold).

        ``exclude_self``: the bank holds the training spots' own image embeddings, so each spot's
        best match is itself; the second best is used.
        """
        z = torch.as_tensor(self._embed(self.adata, "image", None, batch_size))
        bank = torch.as_tensor(self.reference_latent_)
        j = 1 if exclude_self and bank.shape[0] > 1 else 0
        best = torch.cat(
            [(z[s : s + 1024] @ bank.T).topk(j + 1, dim=1).values[:, j] for s in range(0, z.shape[0], 1024)]
        )
        self.ood_similarity_threshold_ = float(np.quantile(best.numpy(), 0.01))

    @torch.inference_mode()
    def _predict_reference(
        self,
        adata: AnnData,
        indices: Sequence[int] | None,
        *,
        k: int,
        weighting: str,
        cols: np.ndarray,
        batch_size: int,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Query-reference retrieval: (prediction, weighted spread of the neighbours, best similarity)."""
        self._check_trained()
        if adata is not None:
            check_adata(adata)
            check_unique_obs_names(adata)
        if getattr(self, "reference_latent_", None) is None:
            raise RuntimeError("The model has no reference bank; train it (or load a trained model) first.")
        if weighting not in ("similarity", "softmax", "uniform"):
            raise ValueError(f"weighting must be 'similarity', 'softmax' or 'uniform'; got {weighting!r}.")
        k = int(min(k, self.reference_latent_.shape[0]))
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}.")
        z_q = torch.as_tensor(self.get_latent_representation(adata, indices, batch_size, modality="image"))
        bank = torch.as_tensor(self.reference_latent_)
        ref = sp.csr_matrix(self.reference_expression[:, cols], dtype=np.float32)
        ref_sq = ref.multiply(ref).tocsr()
        scale = float(self.module.logit_scale().detach().cpu())
        preds, sds, best = [], [], []
        for start in range(0, z_q.shape[0], batch_size):
            sim = z_q[start : start + batch_size] @ bank.T
            top, pos = sim.topk(k, dim=1)
            if weighting == "similarity":
                w = top.clamp(min=0)
                w = torch.where(w.sum(1, keepdim=True) > 0, w, torch.ones_like(w))
            elif weighting == "softmax":
                w = torch.softmax(top * scale, dim=1)
            else:
                w = torch.ones_like(top)
            w = (w / w.sum(1, keepdim=True)).numpy().astype(np.float64)
            n_q = w.shape[0]
            weights = sp.csr_matrix(
                (w.ravel(), pos.numpy().ravel(), np.arange(0, n_q * k + 1, k)), shape=(n_q, ref.shape[0])
            )
            mean = np.asarray((weights @ ref).todense())
            second = np.asarray((weights @ ref_sq).todense())
            preds.append(mean.astype(np.float32))
            sds.append(np.sqrt(np.clip(second - mean**2, 0, None)).astype(np.float32))
            best.append(top[:, 0].numpy().astype(np.float32))
        if not preds:
            empty = np.zeros((0, len(cols)), np.float32)
            return empty, empty.copy(), np.zeros(0, np.float32)
        return np.concatenate(preds), np.concatenate(sds), np.concatenate(best)

    def _predict_full(self, adata: AnnData, genes: Sequence[str], **kwargs: Any) -> dict[str, np.ndarray | None]:
        """Prediction, spread and best reference similarity of every spot of ``adata`` (see tl.predict_expression)."""
        if kwargs.pop("method", "reference") != "reference":
            raise ValueError("method must be 'reference' or 'head' (or 'probe' for STAlign).")
        cols = self._gene_columns(genes)
        kwargs.setdefault("k", 50)
        kwargs.setdefault("weighting", "similarity")
        kwargs.setdefault("batch_size", 512)
        pred, sd, best = self._predict_reference(adata, None, cols=cols, **kwargs)
        return {"pred": pred, "sd": sd, "similarity": best}

    @torch.inference_mode()
    def reference_similarity(self, adata: AnnData | None = None, batch_size: int = 512) -> np.ndarray:
        """Best cosine similarity of each spot's image embedding to the reference bank (n_obs,).

        Spots below ``ood_similarity_threshold_`` (the 1st percentile over the training spots,
        saved with the model) are unlike every training spot: :func:`imagene.tl.predict_expression`
        flags them in ``obs``.
        """
        adata = self._query(adata)
        if getattr(self, "reference_latent_", None) is None:
            raise RuntimeError("The model has no reference bank; train it (or load a trained model) first.")
        z = torch.as_tensor(self.get_latent_representation(adata, None, batch_size, modality="image"))
        bank = torch.as_tensor(self.reference_latent_)
        return torch.cat([(z[s : s + 1024] @ bank.T).max(1).values for s in range(0, z.shape[0], 1024)]).numpy()

    def _gene_columns(self, gene_list: Sequence[str] | None) -> np.ndarray:
        genes = self.gene_names
        if gene_list is None:
            return np.arange(len(genes))
        pos = genes.get_indexer(pd.Index(gene_list))
        if (pos < 0).any():
            unknown = pd.Index(gene_list)[pos < 0][:10].tolist()
            raise KeyError(f"Genes not known to the model: {unknown}. Use genes from `model.gene_names`.")
        return pos

    def predict_expression(
        self,
        adata: AnnData | None = None,
        indices: Sequence[int] | None = None,
        *,
        k: int = 50,
        weighting: Literal["similarity", "softmax", "uniform"] = "similarity",
        gene_list: Sequence[str] | None = None,
        batch_size: int = 512,
        return_numpy: bool = False,
        return_sd: bool = False,
        method: Literal["reference", "head"] = "reference",
    ) -> pd.DataFrame | np.ndarray | tuple:
        """Predict expression from the image alone by query-reference retrieval (or the ridge head).

        Each query spot's image embedding is compared (cosine) with the gene embeddings of the
        reference bank (the training spots, stored with the model); the prediction is the
        weighted mean of the log-normalised expression (``log1p`` of counts per 10k) of the ``k``
        most similar reference spots, and its spread (``return_sd``) the weighted standard
        deviation of those ``k`` references.

        Parameters
        ----------
        adata
            Query with ``obsm[image_key]`` (no expression needed, any genes); the training AnnData when ``None``.
        indices
            Subset of query observations.
        k
            Number of reference neighbours.
        weighting
            ``'similarity'`` (weights ∝ positive cosine similarity), ``'softmax'`` (the model's own
            temperature) or ``'uniform'``.
        gene_list
            Genes to return (default: all of the model's genes, ``model.gene_names``).
        batch_size
            Query spots per step.
        return_numpy
            Return arrays instead of DataFrames.
        return_sd
            Also return the per-spot, per-gene spread (``method='reference'`` only).
        method
            ``'reference'``: the retrieval above. ``'head'``: the ridge head of
            :meth:`fit_expression_head` on the query's image input and latent (centred per section
            of ``obs[library_key]`` when the head was fitted with centring; ``k`` and ``weighting``
            unused).

        Returns
        -------
        (n_obs, n_genes) log-normalised predictions as a DataFrame (obs names × genes) or array;
        with ``return_sd``, a tuple ``(prediction, sd)``.
        """
        adata = self._query(adata)
        cols = self._gene_columns(gene_list)
        if method == "head":
            if return_sd:
                raise ValueError("return_sd is not available with method='head'; use method='reference'.")
            pred = self._predict_head(adata, indices, cols, batch_size)
            return self._format_prediction(adata, indices, cols, pred, None, return_numpy)
        if method != "reference":
            raise ValueError(f"method must be 'reference' or 'head'; got {method!r}.")
        pred, sd, _ = self._predict_reference(
            adata, indices, k=k, weighting=weighting, cols=cols, batch_size=batch_size
        )
        return self._format_prediction(adata, indices, cols, pred, sd if return_sd else None, return_numpy)


def format_prediction(model, adata, indices, cols, pred, sd, return_numpy):
    """Predictions (and spread) as arrays, or DataFrames of obs names × the model's genes ``cols``."""
    if not return_numpy:
        obs_names = adata.obs_names[np.arange(adata.n_obs) if indices is None else np.asarray(indices)]
        genes = model.gene_names[cols]
        pred = pd.DataFrame(pred, index=obs_names, columns=genes)
        if sd is not None:
            sd = pd.DataFrame(sd, index=obs_names, columns=genes)
    return pred if sd is None else (pred, sd)


def compact_counts(counts: Any) -> dict[str, Any]:
    """Integer counts as a small CSR record: uint16 values and column indices when they fit (lossless)."""
    x = sp.csr_matrix(counts, dtype=np.float32)
    x.sum_duplicates()
    data = x.data
    small = data.size == 0 or (np.all(data == np.round(data)) and data.min() >= 0 and data.max() < 2**16)
    return {
        "data": data.astype(np.uint16) if small else data,
        "indices": x.indices.astype(np.uint16 if x.shape[1] < 2**16 else np.int32),
        "indptr": x.indptr.astype(np.int64),
        "shape": tuple(int(v) for v in x.shape),
    }


def expand_counts(stored: dict[str, Any]) -> sp.csr_matrix:
    """The CSR float32 counts of :func:`compact_counts`."""
    return sp.csr_matrix(
        (stored["data"].astype(np.float32), stored["indices"].astype(np.int32), stored["indptr"]), shape=stored["shape"]
    )


def log_normalize_sparse(counts: sp.spmatrix, target_sum: float = 1e4) -> sp.csr_matrix:
    """:func:`imagene._utils.log_normalize` on sparse counts, kept sparse (same float32 values)."""
    x = sp.csr_matrix(counts, dtype=np.float32, copy=True)
    lib = np.asarray(x.sum(1), dtype=np.float32).ravel()
    lib[lib == 0] = 1.0
    rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
    x.data = np.log1p(x.data / lib[rows] * np.float32(target_sum)).astype(np.float32)
    return x
