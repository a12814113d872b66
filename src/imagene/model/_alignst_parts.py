"""ALIGN-ST's inputs (gene tokens, sections, nuclei maps, patch graphs) and its training task.

The parts of :class:`imagene.model.AlignST` that are its own (the shared ones come from
:class:`imagene.model._base.AlignmentMixin`); functions of the model, kept apart so that the model
file stays small.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from imagene import pp
from imagene._constants import KEYS
from imagene._settings import settings
from imagene._utils import get_counts, log_normalize, warn
from imagene.nn import mse_pcc_loss
from imagene.train import TaskPlan, rank_shard

logger = logging.getLogger("imagene")


class SectionTask(TaskPlan):
    """ALIGN-ST's training task: one whole section per step (its patch graph, full batch), MSE + (1 − PCC).

    Training steps sample ``n_genes_per_step`` of the seen genes (its own generator, seeded);
    validation steps use every seen gene, a fixed target for early stopping. Training metrics
    are means over the sections of an epoch, validation metrics are weighted by the spots.
    Module level (picklable) for ``ddp_spawn``; the sections are numpy, served sharded by rank.
    """

    def __init__(self, module: torch.nn.Module, sections: list[dict], *, lr: float, weight_decay: float,
                 n_genes_per_step: int | None, seed: int) -> None:
        super().__init__(module, lr=lr, weight_decay=weight_decay)
        self.sections, self.n_genes_per_step = sections, n_genes_per_step
        self.gen = torch.Generator().manual_seed(seed)

    def __getstate__(self) -> dict:
        # the generator travels as numpy: pickled as is, its state is a temporary tensor that ddp_spawn
        # would share by file descriptor and free before the worker reads it ("unable to resize file")
        state = super().__getstate__()
        state["gen"] = self.gen.get_state().numpy().copy()
        return state

    def __setstate__(self, state: dict) -> None:
        gen = torch.Generator()
        gen.set_state(torch.from_numpy(state.pop("gen")))
        super().__setstate__(state)
        self.gen = gen

    def train_dataloader(self):
        shard = [_as_tensors(self.sections[i]) for i in rank_shard(len(self.sections), self.trainer, seed=0)]
        return torch.utils.data.DataLoader(shard, batch_size=None, shuffle=True, num_workers=0)

    def step(self, batch, batch_idx, mode):  # noqa: ARG002
        tokens, mask, y = batch["tokens"], batch["mask"], batch["y"]
        n_genes = self.n_genes_per_step
        if mode == "train" and n_genes is not None and tokens.shape[0] > n_genes:
            sel = torch.randperm(tokens.shape[0], generator=self.gen)[:n_genes].to(tokens.device)
            tokens, mask, y = tokens[sel], mask[sel], y[:, sel]
        out = self.module(batch["features"], batch.get("nuclei"), batch["edge_index"], tokens, mask)
        loss, pcc = mse_pcc_loss(out["pred"], y)
        return {"loss": loss, "n": 1 if mode == "train" else y.shape[0], "pcc": pcc}


def _as_tensors(batch: dict) -> dict:
    return {k: torch.as_tensor(v) if isinstance(v, np.ndarray) else v for k, v in batch.items()}


def gene_tokens(
    model: Any,
    genes: Sequence[str],
    gene_text: Mapping[str, str] | pd.Series | None = None,
    gene_embeddings: pd.DataFrame | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Token states ``(G, L, D)`` and mask of ``genes`` (text encoder, or one token from varm embeddings)."""
    emb_key = model._setup_args.get("gene_embedding_key")
    genes = [str(g) for g in genes]
    if emb_key is not None:
        if model.adata is not None:
            table = pd.DataFrame(np.asarray(model.adata.varm[emb_key]), index=model.adata.var_names)
        else:  # loaded without data: the seen genes' embeddings were saved with the model
            table = model.gene_embedding_table_ if model.gene_embedding_table_ is not None else pd.DataFrame()
        if gene_embeddings is not None:
            table = pd.concat([table[~table.index.isin(gene_embeddings.index)], pd.DataFrame(gene_embeddings)])
        missing = [g for g in genes if g not in table.index]
        if missing:
            raise KeyError(
                f"No embedding for {len(missing)} genes (e.g. {missing[:5]}); the model uses "
                f"varm[{emb_key!r}]: pass `gene_embeddings=` (DataFrame genes x {table.shape[1]}) for new genes."
            )
        vals = table.loc[genes].to_numpy(np.float32)[:, None, :]
        return vals, np.ones(vals.shape[:2], bool)
    from imagene.datasets import gene_descriptions
    from imagene.nn import get_text_encoder

    user = dict(model._setup_args.get("gene_text") or {})
    if gene_text is not None:
        user.update({str(k): str(v) for k, v in dict(gene_text).items()})
    texts = gene_descriptions(genes, gene_text=user or None)
    missing = [g for g in genes if g not in texts.index]
    if missing:
        raise KeyError(
            f"No description for {len(missing)} genes (e.g. {missing[:5]}). Pass them as `gene_text=` "
            "({symbol: description}) or leave them out."
        )
    todo = [g for g in genes if (g, texts[g]) not in model._token_cache]
    if todo:
        states, mask = get_text_encoder().encode_tokens(
            [texts[g] for g in todo], max_length=model.max_text_length, show_progress_bar=settings.progress_bar
        )
        for g, s, m in zip(todo, states, mask, strict=True):
            model._token_cache[(g, texts[g])] = (s.astype(np.float16), m)
    pairs = [model._token_cache[(g, texts[g])] for g in genes]
    return np.stack([p[0] for p in pairs]).astype(np.float32), np.stack([p[1] for p in pairs])

def _default_seen_genes(model: Any, n_seen_genes: int, exclude: Sequence[str]) -> list[str]:
    """The ``n_seen_genes`` most expressed training genes (mean log1p CP10k) with a description, minus ``exclude``."""
    from imagene.datasets import gene_descriptions

    x = log_normalize(counts(model, model.adata))
    order = np.argsort(-x.mean(0), kind="stable")
    names = model.adata.var_names[order]
    names = names[~names.isin(list(exclude))]
    if model._setup_args.get("gene_embedding_key") is None:
        user = model._setup_args.get("gene_text") or None
        has = gene_descriptions(list(names[: 4 * n_seen_genes + 100]), gene_text=user).index
        names = names[names.isin(has)]
    return list(names[:n_seen_genes])

def counts(model: Any, adata: AnnData) -> sp.csr_matrix:
    return sp.csr_matrix(get_counts(adata, model._setup_args.get("layer"), check=False), dtype=np.float32)

def sections(model: Any, adata: AnnData) -> dict[str, np.ndarray]:
    """``{section: spot positions}`` by ``library_key`` (one section when the query has no such column)."""
    key = model.library_key
    if key is None or key not in adata.obs:
        return {"all": np.arange(adata.n_obs)}
    return pp.resolve_libraries(adata, key)[1]

def nuclei_of(model: Any, adata: AnnData) -> np.ndarray | None:
    """The nuclei maps of ``adata``: ``obsm[nuclei_key]``, or computed in memory (``adata`` is not written)."""
    if not model.use_nuclei:
        return None
    nk = model._setup_args["nuclei_key"]
    if nk in adata.obsm:
        return np.asarray(adata.obsm[nk])
    logger.info("Computing the query's nuclei maps in memory (adata.obsm[%r] is missing; adata is not written)", nk)
    try:
        return pp.nuclei_maps(adata, library_key=model.library_key if model.library_key in adata.obs else None,
                              show_progress_bar=False, inplace=False)
    except (FileNotFoundError, KeyError, ValueError, OSError) as e:
        raise KeyError(
            f"adata.obsm[{nk!r}] (nuclei maps) not found, and they could not be computed from the query's images "
            f"({e}). Compute them first: `imagene.pp.nuclei_maps(adata, key_added={nk!r})`, or pass your own maps."
        ) from e


def section_inputs(model: Any, adata: AnnData, idx: np.ndarray, nuclei: np.ndarray | None) -> dict[str, torch.Tensor]:
    feats = model._image_input(adata, idx).astype(np.float32)
    spatial_key = model._setup_args.get("spatial_key", KEYS.SPATIAL)
    if spatial_key not in adata.obsm:
        raise KeyError(f"adata.obsm[{spatial_key!r}] (spot centres) not found; the patch graph needs them.")
    coords = np.asarray(adata.obsm[spatial_key])[idx, :2].astype(np.float64)
    edges = pp.patch_graph(coords, feats, n_spatial=model.n_spatial_neighbors, n_feature=model.n_feature_neighbors)
    out = {"features": torch.as_tensor(feats), "edge_index": torch.as_tensor(edges, dtype=torch.long)}
    if nuclei is not None:
        nuc = nuclei[idx].astype(np.float32)
        out["nuclei"] = torch.as_tensor(nuc[:, None] if nuc.ndim == 3 else np.moveaxis(nuc, -1, 1))
    return out

def choose_seen_genes(model: Any, seen_genes, n_seen_genes: int, unseen_genes) -> list[str]:
    """The genes to train on (checked), see :meth:`train`."""
    unseen = [str(g) for g in (unseen_genes or [])]
    if seen_genes is None:
        seen = _default_seen_genes(model, int(n_seen_genes), unseen)
    else:
        seen = [str(g) for g in seen_genes]
        absent = [g for g in seen if g not in model.adata.var_names]
        if absent:
            raise KeyError(f"seen_genes not in adata.var_names: {absent[:5]}; train on measured genes only.")
        overlap = set(seen) & set(unseen)
        if overlap:
            raise ValueError(f"{len(overlap)} genes are both seen and unseen (e.g. {sorted(overlap)[:5]}).")
    if len(seen) < 2:
        raise ValueError("At least 2 seen genes are needed to train; pass more `seen_genes=`.")
    return seen

@torch.inference_mode()
def forward_sections(
    model: Any,
    adata: AnnData,
    genes: Sequence[str],
    gene_text: Mapping[str, str] | pd.Series | None = None,
    gene_embeddings: pd.DataFrame | None = None,
) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Spot latents ``(n, d)``, predictions ``(n, G)`` and each section's gene embeddings ``(G, d)``.

    The module's mode is left as it is (evaluation, or Monte-Carlo dropout in ``_predict_full``).
    """
    genes = list(genes)
    # the gene graph sees the requested genes together with the seen genes (as context), so a
    # gene's prediction does not depend on which other genes were requested
    context = [g for g in (model.seen_genes_ or []) if g not in set(genes)]
    tokens, mask = gene_tokens(model, genes + context, gene_text, gene_embeddings)
    tokens_t, mask_t = torch.as_tensor(tokens), torch.as_tensor(mask)
    latent = np.zeros((adata.n_obs, model.module.spot_head.out_features), np.float32)
    pred = np.zeros((adata.n_obs, len(genes)), np.float32)
    gene_emb = []
    nuc = nuclei_of(model, adata)
    for idx in sections(model, adata).values():
        b = section_inputs(model, adata, idx, nuc)
        out = model.module(b["features"], b.get("nuclei"), b["edge_index"], tokens_t, mask_t)
        latent[idx] = out["spots"].numpy()
        pred[idx] = out["pred"][:, : len(genes)].numpy()
        gene_emb.append(out["genes"][: len(genes)].numpy())
    return latent, pred, gene_emb


def check_inputs(adata: AnnData, image_key: str, spatial_key: str, nuclei_key: str | None, gene_text: Any,
                 gene_embedding_key: str | None, library_key: str | None) -> tuple[str | None, dict | None]:
    """``setup_anndata``'s own checks; computes missing nuclei maps. Returns the nuclei key (``None``: none) and the texts."""
    if np.asarray(adata.obsm[image_key]).ndim != 2:
        raise ValueError(f"adata.obsm[{image_key!r}] must be (n_obs, n_features) frozen tile features.")
    if spatial_key not in adata.obsm:
        raise KeyError(f"adata.obsm[{spatial_key!r}] (spot centres) not found; pass `spatial_key=`.")
    if gene_embedding_key is not None and gene_embedding_key not in adata.varm:
        raise KeyError(f"adata.varm[{gene_embedding_key!r}] not found; store your (n_vars, D) gene embeddings there.")
    if gene_text is not None and not isinstance(gene_text, (Mapping, pd.Series)):
        raise TypeError(f"gene_text must be a dict or Series symbol -> text; got {type(gene_text).__name__}.")
    if nuclei_key is not None and nuclei_key not in adata.obsm:
        try:
            pp.nuclei_maps(adata, library_key=library_key, key_added=nuclei_key, show_progress_bar=False)
        except (FileNotFoundError, KeyError, ValueError, OSError) as e:
            warn(
                f"Nuclei maps could not be computed ({e}); AlignST will use the global tile features only. "
                f"Register the H&E images or pass your own maps in adata.obsm[{nuclei_key!r}]."
            )
            nuclei_key = None
    if nuclei_key is not None and np.asarray(adata.obsm[nuclei_key]).ndim not in (3, 4):
        raise ValueError(f"adata.obsm[{nuclei_key!r}] must hold (n_obs, px, px) nuclei maps.")
    gene_text = None if gene_text is None else {str(k): str(v) for k, v in dict(gene_text).items()}
    return nuclei_key, gene_text


def training_sections(model: Any, seen: Sequence[str], held: set[str]) -> tuple[list[dict], list[dict]]:
    """The training AnnData's sections as step inputs (features, graph, nuclei, gene tokens, targets): (train, validation).

    Numpy arrays (loaders turn them into tensors): ``ddp_spawn`` cannot share every tensor with its processes.
    """
    tokens, mask = gene_tokens(model, seen)
    y_all = log_normalize(counts(model, model.adata)[:, model.adata.var_names.get_indexer(seen)])
    batches, val_batches = [], []
    nuc = nuclei_of(model, model.adata)
    for name, idx in sections(model, model.adata).items():
        b = section_inputs(model, model.adata, idx, nuc)
        b = {k: v.numpy() for k, v in b.items()}
        b.update(tokens=tokens, mask=mask, y=np.asarray(y_all[idx]))
        (val_batches if name in held else batches).append(b)
    return batches, val_batches


def prediction_genes(model: Any, gene_list, genes, indices, k: int, weighting: str) -> list[str]:
    """The genes ``predict_expression`` predicts (checked; ``genes=`` is the old name of ``gene_list=``)."""
    if genes is not None:
        if gene_list is not None:
            raise TypeError("`genes` of AlignST.predict_expression was renamed `gene_list`: pass only `gene_list=`.")
        warnings.warn("`genes=` of AlignST.predict_expression is renamed `gene_list=` (as for every model); "
                      "`genes=` will be removed.", FutureWarning, stacklevel=3)
        gene_list = genes
    if indices is not None and any(isinstance(i, str) for i in np.atleast_1d(np.asarray(indices, dtype=object))):
        raise TypeError("The second argument is `indices` (rows of adata); pass the genes as `gene_list=`.")
    if k != 50 or weighting != "similarity":
        warn("AlignST predicts directly, not by query-reference retrieval: `k` and `weighting` are ignored.")
    model._check_trained()
    gene_list = list(model.seen_genes_) if gene_list is None else [str(g) for g in gene_list]
    if not gene_list:
        raise ValueError("gene_list is empty; pass the symbols of the genes to predict.")
    if len(set(gene_list)) != len(gene_list):
        raise ValueError("gene_list holds duplicates; pass each symbol once.")
    return gene_list
