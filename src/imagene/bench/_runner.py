"""The leave-one-section-out (or -patient-out) runner: fit on training sections only, score the held-out one."""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from imagene._constants import KEYS
from imagene._settings import settings
from imagene._utils import check_adata, get_counts, log_normalize, warn
from imagene.bench._methods import TASKS, FoldContext, Method
from imagene.metrics import (
    ari,
    gene_pearson,
    mean_pearson,
    mse,
    nmi,
    recall_at_k,
    top_expressed_genes,
    top_variable_genes,
)

logger = logging.getLogger("imagene")

SPLITS = ("section", "patient", "spot")
#: Recall@k % cut-offs of the retrieval task
RECALL_PERCENTS = (5, 10, 15)
#: obsm keys that are fits over every spot (PCA, UMAP, model latents): never usable as image input
_GLOBAL_FIT_OBSM = ("X_pca", "X_umap", "X_tsne", "X_diffmap", "X_draw_graph_fa", KEYS.LATENT_PREFIX)


def default_methods(task: str = "expression") -> list[Method]:
    """The methods run by default for a task: UMPIRE and every baseline that takes part in it.

    Parameters
    ----------
    task
        ``'expression'``, ``'retrieval'`` or ``'clustering'``.

    Returns
    -------
    New method templates: for ``'expression'`` UMPIRE, BLEEP-style, the ridge probe, the
    context ridge (run only when the context features are in ``obsm``; see
    :class:`imagene.bench.ContextRidge`), the ST-Net-style head, the random-reference and the
    mean-expression floors; for ``'retrieval'`` the same without the mean (it has no image
    embedding); for ``'clustering'`` UMPIRE (joint and image latents), scanpy PCA on expression
    and the image features alone.

    Examples
    --------
    >>> [m.name for m in imagene.bench.default_methods("clustering")]
    ['umpire', 'expression_pca', 'image_features']
    """
    from imagene.bench._baselines import (
        ContextRidge,
        ExpressionPCA,
        ImageFeatures,
        MeanExpression,
        RandomReference,
        RidgeProbe,
        STNetHead,
    )
    from imagene.bench._methods import ImageneModel, bleep_style

    _check_task(task)
    if task == "clustering":
        return [ImageneModel(), ExpressionPCA(), ImageFeatures()]
    methods: list[Method] = [
        ImageneModel(), bleep_style(), RidgeProbe(), ContextRidge(), STNetHead(), RandomReference()
    ]
    if task == "expression":
        methods.append(MeanExpression())
    return methods


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {list(TASKS)}; got {task!r}.")


# ------------------------------------------------------------------------------------------
# guards
# ------------------------------------------------------------------------------------------
def _walk(obj: Any, depth: int = 3, seen: set[int] | None = None) -> Iterator[Any]:
    """Objects reachable from ``obj`` through attributes, dicts and sequences (bounded depth)."""
    seen = set() if seen is None else seen
    if id(obj) in seen or depth < 0:
        return
    seen.add(id(obj))
    yield obj
    if isinstance(obj, (AnnData, np.ndarray, pd.DataFrame, pd.Series, pd.Index, str, bytes, type)) or sp.issparse(obj):
        return
    if type(obj).__module__.split(".")[0] == "torch":
        return
    if isinstance(obj, dict):
        children = list(obj.values())
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return
    for child in children:
        yield from _walk(child, depth - 1, seen)


def _check_template(method: Method) -> None:
    """Refuse templates that carry data or fitted preprocessing from outside the runner."""
    from sklearn.base import BaseEstimator
    from sklearn.exceptions import NotFittedError
    from sklearn.utils.validation import check_is_fitted

    if not isinstance(method, Method):
        raise TypeError(
            f"methods must be imagene.bench.Method instances; got {type(method).__name__}. Subclass "
            "imagene.bench.Method (fit / predict_expression / embed) or use imagene.bench.ImageneModel."
        )
    for obj in _walk(method):
        if isinstance(obj, AnnData):
            raise ValueError(
                f"Method {method.name!r} holds an AnnData before fitting. A method must get its data from fit() "
                "(the runner passes the training sections of each fold): do not pass data to its constructor."
            )
        if isinstance(obj, BaseEstimator):
            try:
                check_is_fitted(obj)
            except (NotFittedError, TypeError):
                continue
            raise ValueError(
                f"Method {method.name!r} holds an already fitted {type(obj).__name__}. Normalisation, scalers, PCA and "
                "gene selection fitted outside the runner may have seen the test sections; pass unfitted objects: "
                "the runner fits each method on the training sections of each fold."
            )


def _check_fitted_data(method: Method, test_names: pd.Index, fold: str) -> None:
    """After fit: no AnnData reachable from the method may hold a held-out spot."""
    for obj in _walk(method):
        if isinstance(obj, AnnData):
            leaked = obj.obs_names.intersection(test_names)
            if len(leaked):
                raise RuntimeError(
                    f"Method {method.name!r} was fitted with {len(leaked)} spots of the held-out fold {fold!r} "
                    f"(e.g. {leaked[:3].tolist()}). Fit only on the AnnData passed to fit()."
                )


def _sources(adata: AnnData, key: str, depth: int = 4) -> list[str]:
    """``key`` and the ``obsm`` keys it was built from (``uns[key]['sources']`` of the context functions)."""
    out = [key]
    info = adata.uns.get(key)
    if depth > 0 and isinstance(info, dict) and info.get("context"):
        for src in info.get("sources", []):
            out += _sources(adata, str(src), depth - 1)
    return out


def _is_context(adata: AnnData, key: str) -> bool:
    info = adata.uns.get(key)
    return isinstance(info, dict) and bool(info.get("context"))


def _check_image_key(adata: AnnData, image_key: str | None) -> str:
    """Check (or, for ``None``, find) an ``obsm`` key of per-spot image features.

    Frozen tile features ``X_he_*`` and the context features built from them
    (:func:`imagene.pp.context_features`, :func:`imagene.pp.neighbor_features`,
    :func:`imagene.pp.context_matrix`: per spot, or a mean over neighbours of the same section)
    pass; representations fitted over all spots (PCA, UMAP, model latents), or context built from
    them, do not. With ``None``, the only ``X_he_*`` key that is not a context key is taken.
    """
    if image_key is None:
        keys = [k for k in adata.obsm if k.startswith(KEYS.FEATURES_PREFIX) and not _is_context(adata, k)]
        if not keys:
            raise KeyError(
                f"No frozen image features in adata.obsm (keys starting with {KEYS.FEATURES_PREFIX!r}). Run "
                "`imagene.pp.extract_tiles` and `imagene.pp.embed_tiles` first, or pass `image_key=`."
            )
        if len(keys) > 1:
            raise ValueError(f"Several image feature keys in adata.obsm {keys}; pass one as `image_key=`.")
        image_key = keys[0]
    if image_key not in adata.obsm:
        raise KeyError(
            f"adata.obsm[{image_key!r}] not found. Pass the obsm key of frozen tile features as `image_key=`."
        )
    fitted = [k for k in _sources(adata, image_key) if k.startswith(_GLOBAL_FIT_OBSM)]
    if fitted:
        what = repr(image_key) if fitted[0] == image_key else f"{image_key!r} (built from {fitted[0]!r})"
        raise ValueError(
            f"image_key={what} is a representation fitted on all spots (PCA / UMAP / a model latent), test "
            "sections included. Use frozen tile features (`imagene.pp.embed_tiles`, obsm 'X_he_<encoder>'): the runner "
            "fits every scaler, PCA and model per fold on the training sections only."
        )
    feats = np.asarray(adata.obsm[image_key])
    if feats.ndim != 2:
        raise ValueError(
            f"adata.obsm[{image_key!r}] must be (n_obs, n_features) frozen features; got shape {feats.shape}. "
            "Embed the tiles with `imagene.pp.embed_tiles`."
        )
    if not np.isfinite(feats).all():
        raise ValueError(f"adata.obsm[{image_key!r}] contains NaN or inf; re-embed the tiles.")
    return image_key


# ------------------------------------------------------------------------------------------
# folds
# ------------------------------------------------------------------------------------------
def _folds(
    adata: AnnData, *, split: str, section_key: str, patient_key: str, n_spot_folds: int, seed: int
) -> list[tuple[str, np.ndarray]]:
    """``(fold name, boolean test mask)`` for every fold."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}.")
    sections = adata.obs[section_key].astype(str).to_numpy()
    names = list(dict.fromkeys(pd.Categorical(sections).categories))
    if split == "spot":
        if len(names) > 1:
            raise ValueError(
                f"split='spot' on {len(names)} sections {names} would put neighbouring spots of one section on both "
                "sides of the split (they share tissue and signal), which inflates every score. Use split='section' "
                "(leave one section out) or split='patient' (leave one patient out)."
            )
        warn(
            "split='spot' on a single section: spots of the test folds neighbour training spots, so scores are "
            "optimistic. Prefer several sections and split='section'."
        )
        from sklearn.model_selection import KFold

        kf = KFold(n_splits=n_spot_folds, shuffle=True, random_state=seed)
        out = []
        for i, (_, test_idx) in enumerate(kf.split(np.arange(adata.n_obs))):
            mask = np.zeros(adata.n_obs, bool)
            mask[test_idx] = True
            out.append((f"spots{i}", mask))
        return out
    if split == "section":
        if len(names) < 2:
            raise ValueError(
                f"Leave-one-section-out needs at least 2 sections in adata.obs[{section_key!r}]; got {names}. "
                "Add sections, or pass split='spot' for a (optimistic) spot-level split of a single section."
            )
        return [(s, sections == s) for s in names]
    if patient_key not in adata.obs:
        raise KeyError(
            f"adata.obs[{patient_key!r}] not found; split='patient' needs the patient of each spot. Add that column "
            "or pass `patient_key=`."
        )
    patients = adata.obs[patient_key].astype(str).to_numpy()
    per_section = pd.Series(patients).groupby(sections).nunique()
    if (per_section > 1).any():
        raise ValueError(
            f"Sections {per_section[per_section > 1].index.tolist()} have spots of several patients in "
            f"adata.obs[{patient_key!r}]; each section must belong to one patient."
        )
    pnames = list(dict.fromkeys(pd.Categorical(patients).categories))
    if len(pnames) < 2:
        raise ValueError(f"Leave-one-patient-out needs at least 2 patients; got {pnames}. Use split='section'.")
    return [(f"patient {p}", patients == p) for p in pnames]


def _training_genes(counts: Any, names: pd.Index, min_detected: float) -> pd.Index:
    detected = np.asarray((counts > 0).mean(0)).ravel()
    genes = names[detected >= min_detected]
    if len(genes) == 0:
        raise ValueError(
            f"No gene is detected in at least {min_detected:.0%} of the training spots; lower `min_detected`."
        )
    return genes


def _subset(
    adata: AnnData,
    mask: np.ndarray,
    genes: pd.Index,
    *,
    counts: Any,
    image_key: str,
    section_key: str,
    with_counts: bool = True,
    drop_obs: Sequence[str] = (),
    extra_keys: Sequence[str] = (),
) -> AnnData:
    """A fresh AnnData with only what methods may use: counts on ``genes``, image features, spots, obs."""
    idx = np.flatnonzero(mask)
    cols = adata.var_names.get_indexer(genes)
    obs = adata.obs.iloc[idx].drop(columns=[c for c in drop_obs if c in adata.obs]).copy()
    for c in obs.columns:  # drop categories of held-out sections
        if isinstance(obs[c].dtype, pd.CategoricalDtype):
            obs[c] = obs[c].cat.remove_unused_categories()
    if with_counts:
        x = sp.csr_matrix(counts[idx][:, cols], dtype=np.float32)
        layers = {KEYS.COUNTS: x.copy()}
    else:
        x = sp.csr_matrix((len(idx), len(cols)), dtype=np.float32)
        layers = {}
    obsm = {k: np.asarray(adata.obsm[k])[idx] for k in dict.fromkeys([image_key, *extra_keys])}
    if KEYS.SPATIAL in adata.obsm:
        obsm[KEYS.SPATIAL] = np.asarray(adata.obsm[KEYS.SPATIAL])[idx]
    out = AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes.copy()), obsm=obsm, layers=layers)
    spatial = adata.uns.get("spatial", {})
    if section_key in obs:
        present = set(obs[section_key].astype(str))
        out.uns["spatial"] = {k: v for k, v in spatial.items() if k in present}
    return out


# ------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------
def _expression_rows(y_true: np.ndarray, pred: np.ndarray, ctx: FoldContext) -> list[tuple[str, float]]:
    rows = []
    for set_name, idx in ((f"hvg{len(ctx.hvg)}", ctx.hvg), (f"heg{len(ctx.heg)}", ctx.heg)):
        t, p = y_true[:, idx], pred[:, idx]
        rows.append((f"pcc_{set_name}", mean_pearson(t, p)))
        rows.append((f"mse_{set_name}", mse(t, p)))
        rows.append((f"undefined_{set_name}", float((~np.isfinite(gene_pearson(t, p))).sum())))
    return rows


def _retrieval_rows(z_image: np.ndarray, z_gene: np.ndarray) -> list[tuple[str, float]]:
    rows = []
    for k in RECALL_PERCENTS:
        i2g = recall_at_k(z_image, z_gene, k_percent=k)
        g2i = recall_at_k(z_gene, z_image, k_percent=k)
        rows += [(f"recall{k}_i2g", i2g), (f"recall{k}_g2i", g2i), (f"recall{k}", 0.5 * (i2g + g2i))]
    return rows


def _leiden(z: np.ndarray, n_clusters: int, seed: int, n_neighbors: int = 15, method: str = "umap") -> np.ndarray:
    """Leiden on scanpy's kNN graph of ``z``; resolution bisected to give ``n_clusters`` clusters (else the closest)."""
    import scanpy as sc

    a = AnnData(X=np.asarray(z, dtype=np.float32))
    k = int(min(n_neighbors, a.n_obs - 1))
    sc.pp.neighbors(a, use_rep="X", n_neighbors=k, method=method, random_state=seed)
    lo, hi = 0.01, 5.0
    best, best_gap = None, math.inf
    for _ in range(30):
        res = 0.5 * (lo + hi)
        sc.tl.leiden(a, resolution=res, flavor="igraph", n_iterations=2, directed=False, random_state=seed)
        labels = a.obs["leiden"].astype(str).to_numpy()
        m = len(set(labels))
        if abs(m - n_clusters) < best_gap:
            best, best_gap = labels, abs(m - n_clusters)
        if m == n_clusters:
            break
        lo, hi = (res, hi) if m < n_clusters else (lo, res)
    return best


def _kmeans(z: np.ndarray, n_clusters: int, seed: int, **_: Any) -> np.ndarray:
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=n_clusters, n_init=10, random_state=seed).fit_predict(np.asarray(z, dtype=np.float64))


# ------------------------------------------------------------------------------------------
# the runner
# ------------------------------------------------------------------------------------------
def run(
    adata: AnnData,
    *,
    section_key: str = KEYS.SECTION,
    task: str | Sequence[str] = "expression",
    methods: Sequence[Method] | None = None,
    split: str = "section",
    patient_key: str = "patient",
    image_key: str | None = None,
    layer: str | None = KEYS.COUNTS,
    label_key: str = "label",
    ignore_labels: Sequence[str] = ("undetermined",),
    n_genes: int = 50,
    min_detected: float = 0.1,
    max_epochs: int = 100,
    seeds: Sequence[int] | None = None,
    n_spot_folds: int = 5,
    clustering_kwargs: dict[str, Any] | None = None,
    test_sections: Sequence[str] | None = None,
) -> pd.DataFrame | dict[str, pd.DataFrame]:
    """Score methods on held-out sections: fit on the training sections only, score the held-out one.

    For each fold (each section held out in turn with ``split='section'``; each patient with
    ``split='patient'``) the runner chooses the training genes (detected in at least
    ``min_detected`` of the TRAINING spots), the HVG / HEG gene sets (``n_genes`` most variable /
    most expressed training genes in ``log1p`` CP10k), seeds everything, and hands each method a
    fresh copy of the training spots. Methods fit their own normalisation, scalers, PCA and models
    there. Then:

    - ``'expression'``: the method predicts the held-out spots from their image features (their
      expression is withheld); metrics ``pcc_hvg50`` / ``pcc_heg50`` (mean per-gene Pearson r over
      defined genes), ``mse_hvg50`` / ``mse_heg50`` (``log1p`` CP10k) and ``undefined_hvg50`` /
      ``undefined_heg50`` (genes whose r is undefined because a prediction or measurement is
      constant); the number is ``n_genes``.
    - ``'retrieval'``: the held-out spots' image and gene embeddings; ``recall{5,10,15}_i2g`` /
      ``_g2i`` (Recall@k % among the held-out spots of the fold, image→gene and gene→image) and
      their mean ``recall{5,10,15}``.
    - ``'clustering'``: unsupervised, per section with reference labels in ``obs[label_key]``: each
      method is fitted on that section's spots WITHOUT the labels, its embedding is clustered by
      leiden (resolution bisected to the number of reference classes) and k-means (that many
      clusters); ``ari_leiden``, ``nmi_leiden``, ``ari_kmeans``, ``nmi_kmeans`` on spots whose label
      is not in ``ignore_labels``. ``split`` is not used (each section is its own fold).

    Every task also records ``seconds`` (fit and inference of the method on the fold). The command
    ``imagene bench --task all`` scores expression and retrieval on the same fits.

    Parameters
    ----------
    adata
        Sections with raw counts, frozen image features in ``obsm`` (``X_he_<encoder>``), unique
        ``obs_names`` and a section column.
    section_key
        ``obs`` column of sections.
    task
        ``'expression'``, ``'retrieval'`` or ``'clustering'``; or a list of ``'expression'`` and
        ``'retrieval'``, scored on the same fit of each method and fold.
    methods
        Method templates (:class:`imagene.bench.Method`); ``None`` for :func:`default_methods`.
    split
        ``'section'``, ``'patient'``, or ``'spot'`` (k-fold over spots, allowed on ONE section
        only: with several sections it raises ``ValueError``).
    patient_key
        ``obs`` column of patients for ``split='patient'``.
    image_key
        ``obsm`` key of the frozen features (the only ``X_he_*`` key when ``None``).
    layer
        Layer of raw counts (``None`` for ``X``).
    label_key
        ``obs`` column of reference labels (clustering).
    ignore_labels
        Labels left out of the clustering scores (e.g. ``'undetermined'``).
    n_genes
        Size of the HVG and HEG sets.
    min_detected
        Fraction of training spots in which a gene must be detected to be modelled.
    max_epochs
        Training budget of the methods that train.
    seeds
        Seeds; every fold is repeated once per seed. Default ``(0,)``, ``(0, 1, 2)`` for clustering.
    n_spot_folds
        Folds of ``split='spot'``.
    clustering_kwargs
        Graph of the leiden clustering: ``n_neighbors`` (15) and ``method`` (``'umap'``, or
        ``'gauss'``), passed to :func:`scanpy.pp.neighbors`.
    test_sections
        A fixed test set (expression and retrieval, ``split='section'``): each method is fitted
        once on every section NOT listed (genes, HVG / HEG and every scaler chosen there), then
        scores each listed section as its own fold, the way new slides are predicted from a
        trained model. ``None`` (default) leaves every section out in turn.

    Returns
    -------
    Tidy :class:`~pandas.DataFrame` with columns ``method``, ``fold``, ``metric``, ``value`` (one row
    per method, fold and metric); :func:`imagene.bench.summarize` gives mean ± std over folds. With
    a list of tasks, a dict of such frames by task.

    Examples
    --------
    >>> df = imagene.bench.run(adata, section_key="section", task="expression")
    >>> imagene.bench.summarize(df)
    """
    tasks = (task,) if isinstance(task, str) else tuple(task)
    out = _run_tasks(
        adata,
        tasks,
        section_key=section_key,
        methods=methods,
        split=split,
        patient_key=patient_key,
        image_key=image_key,
        layer=layer,
        label_key=label_key,
        ignore_labels=ignore_labels,
        n_genes=n_genes,
        min_detected=min_detected,
        max_epochs=max_epochs,
        seeds=seeds,
        n_spot_folds=n_spot_folds,
        clustering_kwargs=clustering_kwargs,
        test_sections=test_sections,
    )
    return out[task] if isinstance(task, str) else out


def _run_tasks(
    adata: AnnData,
    tasks: tuple[str, ...],
    *,
    section_key: str,
    methods: Sequence[Method] | None,
    split: str,
    patient_key: str,
    image_key: str | None,
    layer: str | None,
    label_key: str,
    ignore_labels: Sequence[str],
    n_genes: int,
    min_detected: float,
    max_epochs: int,
    seeds: Sequence[int] | None,
    n_spot_folds: int,
    clustering_kwargs: dict[str, Any] | None,
    test_sections: Sequence[str] | None = None,
) -> dict[str, pd.DataFrame]:
    """:func:`run` for several tasks on the same folds: each method is fitted once per fold and scored on
    every requested task it takes part in (expression and retrieval share their fits)."""
    check_adata(adata)
    if isinstance(tasks, str) or not tasks:
        raise TypeError(f"tasks must be a non-empty tuple of task names; got {tasks!r}.")
    for task in tasks:
        _check_task(task)
    clustering = "clustering" in tasks
    if clustering and len(tasks) > 1:
        raise ValueError("The clustering task has its own folds (labelled sections); run it separately.")
    if clustering and test_sections is not None:
        raise ValueError(
            "test_sections applies to the expression and retrieval tasks; the clustering task is unsupervised and "
            "scores each labelled section on its own. Drop test_sections for clustering."
        )
    if section_key not in adata.obs:
        raise KeyError(f"adata.obs[{section_key!r}] not found. Pass the obs column of sections as `section_key=`.")
    if adata.obs_names.has_duplicates:
        raise ValueError(
            "adata.obs_names are not unique, so held-out spots cannot be told from training spots. Concatenate "
            "sections with `imagene.io.concat` (it suffixes names with the section) or call "
            "`adata.obs_names_make_unique()`."
        )
    if not (0 <= min_detected < 1):
        raise ValueError(f"min_detected must be a fraction in [0, 1); got {min_detected!r}.")
    n_sections = adata.obs[section_key].astype(str).nunique()
    if split == "spot" and n_sections > 1:
        _folds(adata, split=split, section_key=section_key, patient_key=patient_key, n_spot_folds=n_spot_folds, seed=0)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}; got {split!r}.")
    image_key = _check_image_key(adata, image_key)
    counts = sp.csr_matrix(get_counts(adata, layer))
    defaults = methods is None
    if defaults:
        methods = list({m.name: m for t in tasks for m in default_methods(t)}.values())
    methods = list(methods)
    if defaults:  # a default method whose inputs were not built is left out, and said so
        missing = {m.name: [k for k in m.input_keys(image_key) if k not in adata.obsm] for m in methods}
        for name, keys in missing.items():
            if keys:
                warn(
                    f"Skipping {name!r}: adata.obsm lacks {keys}. Build the context features with "
                    "`imagene.pp.context_features`, `imagene.pp.niches` and `imagene.pp.context_matrix` (or "
                    "`imagene.bench.read_sections(..., context=True)`) to run it."
                )
        methods = [m for m in methods if not missing[m.name]]
    if not methods:
        raise ValueError("No methods to run; pass a list of imagene.bench.Method or leave `methods=None`.")
    for m in methods:
        _check_template(m)
        if not set(tasks) & set(m.tasks):
            task = tasks[0] if len(tasks) == 1 else list(tasks)
            raise ValueError(
                f"Method {m.name!r} does not take part in task {task!r} (its tasks: {list(m.tasks)}). "
                f"Use imagene.bench.default_methods({tasks[0]!r}) or drop it."
            )
    extra_keys: list[str] = []
    for m in methods:
        for k in m.input_keys(image_key):
            if k not in adata.obsm:
                raise KeyError(
                    f"Method {m.name!r} reads adata.obsm[{k!r}], which is missing. Build it first (context features: "
                    "`imagene.pp.context_features`, `imagene.pp.niches`, `imagene.pp.context_matrix`) or drop the "
                    "method."
                )
            extra_keys.append(_check_image_key(adata, k))
    extra_keys = list(dict.fromkeys(k for k in extra_keys if k != image_key))
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"Method names must be unique; got {names}. Pass `name=` to tell them apart.")
    seeds = tuple(seeds) if seeds is not None else ((0, 1, 2) if clustering else (0,))
    clustering_kwargs = dict(clustering_kwargs or {})
    unknown = set(clustering_kwargs) - {"n_neighbors", "method"}
    if unknown:
        raise ValueError(f"clustering_kwargs accepts 'n_neighbors' and 'method'; got {sorted(unknown)}.")

    # each fold: (name, training mask, [(scored name, test mask), ...]); every test part is scored on one fit
    if clustering:
        parts = _clustering_folds(adata, section_key=section_key, label_key=label_key, ignore_labels=ignore_labels)
        folds = [(name, mask, [(name, mask)]) for name, mask in parts]
    elif test_sections is not None:
        folds = _fixed_test_folds(adata, section_key=section_key, split=split, test_sections=test_sections)
    else:
        parts = _folds(
            adata, split=split, section_key=section_key, patient_key=patient_key, n_spot_folds=n_spot_folds,
            seed=seeds[0],
        )
        folds = [(name, ~mask, [(name, mask)]) for name, mask in parts]

    records: dict[str, list[dict[str, Any]]] = {t: [] for t in tasks}
    sections = adata.obs[section_key].astype(str).to_numpy()
    for fold, train_mask, test_parts in folds:
        any_test = np.logical_or.reduce([m for _, m in test_parts])
        genes = _training_genes(counts[train_mask], adata.var_names, min_detected)
        cols = adata.var_names.get_indexer(genes)
        y_train = log_normalize(counts[train_mask][:, cols])
        hvg = top_variable_genes(y_train, n_genes)
        heg = top_expressed_genes(y_train, n_genes)
        drop = [label_key] if clustering else []
        sub = {"counts": counts, "image_key": image_key, "section_key": section_key, "extra_keys": extra_keys}
        train = _subset(adata, train_mask, genes, drop_obs=drop, **sub)
        scored = []
        for part, test_mask in test_parts:
            test_blind = _subset(adata, test_mask, genes, with_counts=False, drop_obs=[label_key], **sub)
            test_full = _subset(adata, test_mask, genes, drop_obs=[label_key], **sub)
            if not clustering:
                overlap = train.obs_names.intersection(test_full.obs_names)
                if len(overlap):  # pragma: no cover - the split above cannot produce this
                    raise RuntimeError(f"Fold {fold!r}: {len(overlap)} spots are both training and test spots.")
            y_test = log_normalize(counts[test_mask][:, cols])
            n_clusters, keep = None, None
            if clustering:
                truth = adata.obs[label_key][test_mask]
                keep = truth.notna().to_numpy() & ~truth.astype(str).isin(list(ignore_labels)).to_numpy()
                n_clusters = int(truth[keep].astype(str).nunique())
            scored.append((part, test_mask, test_blind, test_full, y_test, keep, n_clusters))
        test_names = adata.obs_names[any_test]
        for seed in seeds:
            fold_name = fold if len(seeds) == 1 else f"{fold}/seed{seed}"
            ctx = FoldContext(
                task="+".join(tasks),
                fold=fold_name,
                train_sections=tuple(dict.fromkeys(sections[train_mask])),
                test_sections=tuple(dict.fromkeys(sections[any_test])),
                section_key=section_key,
                image_key=image_key,
                layer=KEYS.COUNTS,
                genes=genes,
                hvg=hvg,
                heg=heg,
                seed=int(seed),
                max_epochs=int(max_epochs),
                n_clusters=scored[0][-1],
            )
            for template in methods:
                method = copy.deepcopy(template)
                settings.seed = int(seed)
                t0 = time.perf_counter()
                method.fit(train.copy(), ctx=ctx)
                fit_s = time.perf_counter() - t0
                if not clustering:
                    _check_fitted_data(method, test_names, fold)
                for part, test_mask, test_blind, test_full, y_test, keep, _ in scored:
                    part_name = part if len(seeds) == 1 else f"{part}/seed{seed}"
                    for task in tasks:
                        if task not in method.tasks:
                            continue
                        t1 = time.perf_counter()
                        rows = _score(
                            method, task, ctx, test_blind, test_full, y_test, adata, test_mask, label_key, keep,
                            clustering_kwargs,
                        )
                        seconds = fit_s + time.perf_counter() - t1
                        out = records[task]
                        for name, metric, value in rows:
                            out.append({"method": name, "fold": part_name, "metric": metric, "value": float(value)})
                        for name in dict.fromkeys(r[0] for r in rows):  # one row per result name (modalities)
                            out.append({"method": name, "fold": part_name, "metric": "seconds", "value": seconds})
                logger.info("bench %s | fold %s | %s: %.1f s", ctx.task, fold_name, method.name,
                            time.perf_counter() - t0)
    return {t: pd.DataFrame.from_records(r, columns=["method", "fold", "metric", "value"]) for t, r in records.items()}


def _fixed_test_folds(
    adata: AnnData, *, section_key: str, split: str, test_sections: Sequence[str]
) -> list[tuple[str, np.ndarray, list[tuple[str, np.ndarray]]]]:
    """One fit on every section not in ``test_sections``, scored on each test section in turn."""
    if split != "section":
        raise ValueError(
            f"test_sections fixes the held-out sections, so it replaces split={split!r}; pass split='section' "
            "(the default) with test_sections, or drop test_sections to leave one patient out."
        )
    tests = [test_sections] if isinstance(test_sections, str) else [str(s) for s in test_sections]
    sections = adata.obs[section_key].astype(str).to_numpy()
    names = list(pd.Categorical(sections).categories)
    unknown = [s for s in tests if s not in names]
    if not tests or unknown or len(set(tests)) != len(tests):
        raise ValueError(
            f"test_sections must name distinct sections of adata.obs[{section_key!r}] ({names}); got {tests}."
        )
    train = ~np.isin(sections, tests)
    if not train.any():
        raise ValueError(f"test_sections {tests} leaves no training section; keep at least one section out of it.")
    return [("test " + "+".join(tests), train, [(s, sections == s) for s in tests])]


def _clustering_folds(
    adata: AnnData, *, section_key: str, label_key: str, ignore_labels: Sequence[str]
) -> list[tuple[str, np.ndarray]]:
    if label_key not in adata.obs:
        raise KeyError(
            f"adata.obs[{label_key!r}] not found: the clustering task scores clusters against reference labels "
            "(e.g. pathologist regions). Add them, or pass the obs column as `label_key=`."
        )
    sections = adata.obs[section_key].astype(str)
    labels = adata.obs[label_key]
    usable = labels.notna() & ~labels.astype(str).isin(list(ignore_labels))
    out = []
    for s in pd.Categorical(sections).categories:
        mask = (sections == s).to_numpy()
        n_classes = labels[mask & usable.to_numpy()].astype(str).nunique()
        if n_classes >= 2:
            out.append((str(s), mask))
    if not out:
        raise ValueError(
            f"No section has at least 2 reference classes in adata.obs[{label_key!r}] "
            f"(ignoring {list(ignore_labels)}); "
            "the clustering task needs labelled sections."
        )
    return out


def _score(
    method: Method,
    task: str,
    ctx: FoldContext,
    test_blind: AnnData,
    test_full: AnnData,
    y_test: np.ndarray,
    adata: AnnData,
    test_mask: np.ndarray,
    label_key: str,
    keep: np.ndarray | None,
    clustering_kwargs: dict[str, Any],
) -> list[tuple[str, str, float]]:
    if task == "expression":
        out = method.predict_expression(test_blind.copy())
        # a method may return several predictions of one fit, as {key: array}, scored as "name[key]"
        preds = {f"{method.name}[{k}]": v for k, v in out.items()} if isinstance(out, dict) else {method.name: out}
        rows = []
        for name, pred in preds.items():
            pred = np.asarray(pred, dtype=np.float64)
            if pred.shape != y_test.shape:
                raise ValueError(
                    f"Method {name!r} returned predictions of shape {pred.shape}; expected {y_test.shape} "
                    "(held-out spots x ctx.genes, in that order)."
                )
            if not np.isfinite(pred).all():
                raise ValueError(f"Method {name!r} returned NaN or inf predictions.")
            rows += [(name, m, v) for m, v in _expression_rows(y_test, pred, ctx)]
        return rows
    if task == "retrieval":
        zi = np.asarray(method.embed(test_blind.copy(), "image"))
        zg = np.asarray(method.embed(test_full.copy(), "gene"))
        return [(method.name, m, v) for m, v in _retrieval_rows(zi, zg)]
    truth = adata.obs[label_key][test_mask].astype(str).to_numpy()[keep]
    rows = []
    modalities = method.clustering_modalities
    for modality in modalities:
        name = method.name if len(modalities) == 1 else f"{method.name}[{modality}]"
        z = np.asarray(method.embed(test_full.copy(), modality))
        for algo, fn in (("leiden", _leiden), ("kmeans", _kmeans)):
            pred = np.asarray(fn(z, ctx.n_clusters, ctx.seed, **clustering_kwargs))[keep]
            rows += [(name, f"ari_{algo}", ari(truth, pred)), (name, f"nmi_{algo}", nmi(truth, pred))]
    return rows
