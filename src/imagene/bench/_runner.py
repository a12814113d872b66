"""The leave-one-section-out (or -patient-out) runner: fit on training sections only, score the held-out one."""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata import AnnData

from imagene._constants import KEYS
from imagene._settings import settings
from imagene._utils import check_adata, get_counts, log_normalize, warn
from imagene._validate import renamed_kwarg
from imagene.bench._methods import TASKS, FoldContext, Method
from imagene.bench._tasks import RECALL_PERCENTS, SPLITS, TASK_TYPES, Fold, RunSpec, Task, TestPart, check_split
from imagene.metrics import top_expressed_genes, top_variable_genes

logger = logging.getLogger("imagene")

__all__ = ["RECALL_PERCENTS", "SPLITS", "default_methods", "run"]
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
    context ridge and UMPIRE on the context matrix (run only when the context features are in
    ``obsm``; see :class:`imagene.bench.ContextRidge` and :func:`imagene.bench.umpire_context`),
    the ST-Net-style head, the random-reference and the
    mean-expression floors; for ``'retrieval'`` the same without the mean (it has no image
    embedding); for ``'clustering'`` UMPIRE (joint and image latents), scanpy PCA on expression
    and the image features alone, each also averaged once and twice over every spot and its 6
    nearest spots (the spatially smoothed baselines ``*_smooth1``, ``*_smooth2``).

    Examples
    --------
    >>> [m.name for m in imagene.bench.default_methods("clustering")]
    ['umpire', 'expression_pca', 'expression_pca_smooth1', 'expression_pca_smooth2', 'image_features', ...]
    """
    from imagene.bench import _baselines as b
    from imagene.bench._methods import ImageneModel, bleep_style, umpire_context

    _check_task(task)
    if task == "clustering":
        return [
            ImageneModel(), b.ExpressionPCA(), b.ExpressionPCA(smooth=1), b.ExpressionPCA(smooth=2),
            b.ImageFeatures(), b.ImageFeatures(smooth=1), b.ImageFeatures(smooth=2),
        ]
    methods: list[Method] = [
        ImageneModel(), bleep_style(), b.RidgeProbe(), b.ContextRidge(), umpire_context(), b.STNetHead(),
        b.RandomReference(),
    ]
    if task == "expression":
        methods.append(b.MeanExpression())
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
# what methods see
# ------------------------------------------------------------------------------------------
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
    library_key: str,
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
    for k in obsm:  # the context functions' provenance (block widths, sources): no fit, nothing per spot
        if _is_context(adata, k):
            out.uns[k] = dict(adata.uns[k])
    spatial = adata.uns.get("spatial", {})
    if library_key in obs:
        present = set(obs[library_key].astype(str))
        out.uns["spatial"] = {k: v for k, v in spatial.items() if k in present}
    return out


# ------------------------------------------------------------------------------------------
# the runner
# ------------------------------------------------------------------------------------------
def run(
    adata: AnnData,
    *,
    library_key: str | None = None,
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
    section_key: str | None = None,
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
    library_key
        ``obs`` column of sections (default ``'section'``).
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
    section_key
        Old name of ``library_key`` (FutureWarning).

    Returns
    -------
    Tidy :class:`~pandas.DataFrame` with columns ``method``, ``fold``, ``metric``, ``value`` (one row
    per method, fold and metric); :func:`imagene.bench.summarize` gives mean ± std over folds. With
    a list of tasks, a dict of such frames by task.

    Examples
    --------
    >>> df = imagene.bench.run(adata, library_key="section", task="expression")
    >>> imagene.bench.summarize(df)
    """
    check_adata(adata)
    library_key = renamed_kwarg("library_key", library_key, "section_key", section_key, where="imagene.bench.run")
    library_key = KEYS.SECTION if library_key is None else library_key
    tasks = (task,) if isinstance(task, str) else tuple(task)
    if not tasks:
        raise TypeError(f"task must be a task name or a non-empty list of them; got {task!r}.")
    for t in tasks:
        _check_task(t)
    objs = [TASK_TYPES[t]() for t in tasks]
    if len({o.fold_kind for o in objs}) > 1:
        raise ValueError("The clustering task has its own folds (labelled sections); run it separately.")
    spec = RunSpec(
        library_key=library_key, split=split, patient_key=patient_key, label_key=label_key,
        ignore_labels=tuple(ignore_labels), n_spot_folds=n_spot_folds, test_sections=test_sections,
        clustering_kwargs=_check_clustering_kwargs(clustering_kwargs),
    )
    out = _run(
        adata, objs, spec, methods=methods, image_key=image_key, layer=layer, n_genes=n_genes,
        min_detected=min_detected, max_epochs=max_epochs, seeds=seeds,
    )
    return out[task] if isinstance(task, str) else out


def _check_clustering_kwargs(clustering_kwargs: dict[str, Any] | None) -> dict[str, Any]:
    out = dict(clustering_kwargs or {})
    unknown = set(out) - {"n_neighbors", "method"}
    if unknown:
        raise ValueError(f"clustering_kwargs accepts 'n_neighbors' and 'method'; got {sorted(unknown)}.")
    return out


@contextmanager
def seeded(seed: int):
    """``imagene.settings.seed = seed`` inside the block; the previous seed setting is restored after it."""
    previous = settings.seed
    settings.seed = int(seed)
    try:
        yield
    finally:
        settings.seed = previous  # None (the default) only clears the setting


def _check_methods(
    adata: AnnData, tasks: Sequence[Task], methods: Sequence[Method] | None, image_key: str
) -> tuple[list[Method], list[str]]:
    """The method templates (checked: no data, nothing fitted, unique names, inputs present) and their extra keys."""
    names = [t.name for t in tasks]
    defaults = methods is None
    if defaults:
        methods = list({m.name: m for t in names for m in default_methods(t)}.values())
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
        if not set(names) & set(m.tasks):
            task = names[0] if len(names) == 1 else names
            raise ValueError(
                f"Method {m.name!r} does not take part in task {task!r} (its tasks: {list(m.tasks)}). "
                f"Use imagene.bench.default_methods({names[0]!r}) or drop it."
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
    method_names = [m.name for m in methods]
    if len(set(method_names)) != len(method_names):
        raise ValueError(f"Method names must be unique; got {method_names}. Pass `name=` to tell them apart.")
    return methods, extra_keys


def _run(
    adata: AnnData,
    tasks: Sequence[Task],
    spec: RunSpec,
    *,
    methods: Sequence[Method] | None,
    image_key: str | None,
    layer: str | None,
    n_genes: int,
    min_detected: float,
    max_epochs: int,
    seeds: Sequence[int] | None,
) -> dict[str, pd.DataFrame]:
    """Tasks × methods × folds: each method is fitted once per fold and seed and scored on every task it takes
    part in (tasks given together share their folds, so expression and retrieval share their fits)."""
    library_key = spec.library_key
    for t in tasks:
        t.check(adata, spec)
    if library_key not in adata.obs:
        raise KeyError(f"adata.obs[{library_key!r}] not found. Pass the obs column of sections as `library_key=`.")
    if adata.obs_names.has_duplicates:
        raise ValueError(
            "adata.obs_names are not unique, so held-out spots cannot be told from training spots. Concatenate "
            "sections with `imagene.io.concat` (it suffixes names with the section) or call "
            "`adata.obs_names_make_unique()`."
        )
    if not (0 <= min_detected < 1):
        raise ValueError(f"min_detected must be a fraction in [0, 1); got {min_detected!r}.")
    check_split(adata, spec.split, library_key)
    image_key = _check_image_key(adata, image_key)
    counts = sp.csr_matrix(get_counts(adata, layer))
    methods, extra_keys = _check_methods(adata, tasks, methods, image_key)
    seeds = tuple(seeds) if seeds is not None else max((t.default_seeds for t in tasks), key=len)
    lead = tasks[0]  # tasks given together share their folds
    folds = lead.folds(adata, spec, seeds[0])
    records: dict[str, list[dict[str, Any]]] = {t.name: [] for t in tasks}
    for fold in folds:
        _run_fold(
            adata, fold, tasks, spec, methods, records, counts=counts, image_key=image_key, extra_keys=extra_keys,
            n_genes=n_genes, min_detected=min_detected, max_epochs=max_epochs, seeds=seeds,
        )
    return {t: pd.DataFrame.from_records(r, columns=["method", "fold", "metric", "value"]) for t, r in records.items()}


def _run_fold(
    adata: AnnData,
    fold: Fold,
    tasks: Sequence[Task],
    spec: RunSpec,
    methods: Sequence[Method],
    records: dict[str, list[dict[str, Any]]],
    *,
    counts: sp.csr_matrix,
    image_key: str,
    extra_keys: Sequence[str],
    n_genes: int,
    min_detected: float,
    max_epochs: int,
    seeds: Sequence[int],
) -> None:
    """One fold: genes and gene sets from its training spots, what methods see, then every seed and method."""
    library_key, label_key = spec.library_key, spec.label_key
    lead = tasks[0]
    train_mask = fold.train
    any_test = np.logical_or.reduce([m for _, m in fold.parts])
    genes = _training_genes(counts[train_mask], adata.var_names, min_detected)
    cols = adata.var_names.get_indexer(genes)
    y_train = log_normalize(counts[train_mask][:, cols])
    hvg = top_variable_genes(y_train, n_genes)
    heg = top_expressed_genes(y_train, n_genes)
    sub = {"counts": counts, "image_key": image_key, "library_key": library_key, "extra_keys": extra_keys}
    drop = [label_key] if lead.hide_labels_in_training else []
    train = _subset(adata, train_mask, genes, drop_obs=drop, **sub)
    parts = []
    for name, test_mask in fold.parts:
        part = TestPart(
            name=name,
            mask=test_mask,
            blind=_subset(adata, test_mask, genes, with_counts=False, drop_obs=[label_key], **sub),
            full=_subset(adata, test_mask, genes, drop_obs=[label_key], **sub),
            y=log_normalize(counts[test_mask][:, cols]),
        )
        if lead.disjoint:
            overlap = train.obs_names.intersection(part.full.obs_names)
            if len(overlap):  # pragma: no cover - the folds cannot produce this
                raise RuntimeError(f"Fold {fold.name!r}: {len(overlap)} spots are both training and test spots.")
        for t in tasks:
            part = t.part(adata, test_mask, spec, part)
        parts.append(part)
    test_names = adata.obs_names[any_test]
    sections = adata.obs[library_key].astype(str).to_numpy()
    task_name = "+".join(t.name for t in tasks)
    for seed in seeds:
        fold_name = fold.name if len(seeds) == 1 else f"{fold.name}/seed{seed}"
        ctx = FoldContext(
            task=task_name,
            fold=fold_name,
            train_sections=tuple(dict.fromkeys(sections[train_mask])),
            test_sections=tuple(dict.fromkeys(sections[any_test])),
            library_key=library_key,
            image_key=image_key,
            layer=KEYS.COUNTS,
            genes=genes,
            hvg=hvg,
            heg=heg,
            seed=int(seed),
            max_epochs=int(max_epochs),
            n_clusters=parts[0].n_clusters,
        )
        for template in methods:
            method = copy.deepcopy(template)
            with seeded(seed):
                t0 = time.perf_counter()
                method.fit(train.copy(), ctx=ctx)
                fit_s = time.perf_counter() - t0
                if lead.disjoint:
                    _check_fitted_data(method, test_names, fold.name)
                for part in parts:
                    part_name = part.name if len(seeds) == 1 else f"{part.name}/seed{seed}"
                    for t in tasks:
                        if t.name not in method.tasks:
                            continue
                        t1 = time.perf_counter()
                        rows = t.score(method, ctx, part, spec)
                        seconds = fit_s + time.perf_counter() - t1
                        out = records[t.name]
                        for name, metric, value in rows:
                            out.append({"method": name, "fold": part_name, "metric": metric, "value": float(value)})
                        for name in dict.fromkeys(r[0] for r in rows):  # one row per result name (modalities)
                            out.append({"method": name, "fold": part_name, "metric": "seconds", "value": seconds})
            logger.info("bench %s | fold %s | %s: %.1f s", task_name, fold_name, method.name, time.perf_counter() - t0)
