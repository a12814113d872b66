"""The method interface of the benchmark, and imagene models wrapped in it."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
from anndata import AnnData

from imagene._utils import log_normalize
from imagene.pp import CONTEXT_SUFFIX

logger = logging.getLogger("imagene")

#: tasks of the benchmark
TASKS = ("expression", "retrieval", "clustering")


@dataclass(frozen=True)
class FoldContext:
    """What the runner tells a method about the fold it is fitted on.

    Everything here was chosen on the training spots of the fold only.

    Attributes
    ----------
    task
        The task(s) the fit serves: ``'expression'``, ``'retrieval'``, ``'clustering'``, or
        ``'expression+retrieval'`` when the command scores both on one fit.
    fold
        Name of the fold (the held-out section(s) or patient).
    train_sections, test_sections
        Sections on each side of the split (the same section for clustering, which is unsupervised).
    library_key
        ``obs`` column of sections in the AnnData given to ``fit``.
    image_key
        ``obsm`` key of the frozen image features.
    layer
        Layer of raw counts (also in ``X``).
    genes
        The training genes (detected in enough training spots), in the order of every AnnData the
        method receives and of the predictions it must return.
    hvg, heg
        Positions in ``genes`` of the most variable / most expressed training genes (``log1p`` CP10k).
    seed
        Seed of this fit (already applied to Python, NumPy, torch and scvi-tools by the runner).
    max_epochs
        Training budget for methods that train.
    n_clusters
        Number of reference classes (clustering task only).

    Examples
    --------
    >>> class TopGenes(imagene.bench.MeanExpression):
    ...     def fit(self, train, *, ctx):
    ...         super().fit(train, ctx=ctx)
    ...         self.hvg_names_ = ctx.genes[ctx.hvg]  # the fold's HVG50, chosen on training spots
    """

    task: str
    fold: str
    train_sections: tuple[str, ...]
    test_sections: tuple[str, ...]
    library_key: str
    image_key: str
    layer: str
    genes: pd.Index
    hvg: np.ndarray = field(repr=False)
    heg: np.ndarray = field(repr=False)
    seed: int = 0
    max_epochs: int = 100
    n_clusters: int | None = None

    @property
    def section_key(self) -> str:
        """Deprecated name of :attr:`library_key` (FutureWarning)."""
        import warnings

        warnings.warn("FoldContext.section_key is deprecated; use FoldContext.library_key.", FutureWarning, stacklevel=2)
        return self.library_key


class Method:
    """Base class of every method the benchmark runs (imagene models and baselines alike).

    A method is a template: the runner deep-copies it for each fold, calls :meth:`fit` with the
    training spots only (raw counts on the fold's training genes in ``layers[ctx.layer]`` and
    ``X``, frozen image features in ``obsm[ctx.image_key]``, ``obsm['spatial']``, ``obs``), then
    :meth:`predict_expression` with held-out spots that carry NO expression (image features only),
    or :meth:`embed`. Subclasses set :attr:`name` and :attr:`tasks` and implement what their tasks
    need.

    Attributes
    ----------
    name
        Name in the results.
    tasks
        Tasks the method takes part in (subset of ``'expression'``, ``'retrieval'``, ``'clustering'``).
    clustering_modalities
        Modalities passed to :meth:`embed` for clustering (one result row each).

    Examples
    --------
    >>> class Median(imagene.bench.Method):
    ...     name, tasks = "median", ("expression",)
    ...     def fit(self, train, *, ctx):
    ...         self.median_ = np.median(log_normalize(train.layers[ctx.layer]), axis=0)
    ...     def predict_expression(self, test):
    ...         return np.tile(self.median_, (test.n_obs, 1))
    >>> imagene.bench.run(adata, methods=[Median()])
    """

    name: str = "method"
    tasks: tuple[str, ...] = ()
    clustering_modalities: tuple[str, ...] = ()

    def fit(self, train: AnnData, *, ctx: FoldContext) -> None:
        """Fit on the training spots of one fold.

        Parameters
        ----------
        train
            Training spots (a copy made for this method).
        ctx
            The fold (training genes, keys, seed, budget).

        Returns
        -------
        Nothing; keep the fitted state on ``self``.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement fit(train, *, ctx).")

    def predict_expression(self, test: AnnData) -> np.ndarray:
        """Predict expression of held-out spots from their image features.

        Parameters
        ----------
        test
            Held-out spots with ``obsm[ctx.image_key]``; their expression is withheld (``X`` is zero,
            no layers).

        Returns
        -------
        (n_test, len(ctx.genes)) ``log1p`` CP10k predictions, genes in ``ctx.genes`` order.
        """
        raise NotImplementedError(f"{type(self).__name__} does not predict expression.")

    def embed(self, adata: AnnData, modality: str) -> np.ndarray:
        """Embed spots in one modality.

        Parameters
        ----------
        adata
            Spots to embed (with counts for ``'gene'`` / ``'joint'``, without for ``'image'``).
        modality
            ``'image'``, ``'gene'`` or ``'joint'``.

        Returns
        -------
        (n_obs, d) array; retrieval pairs the ``'image'`` and ``'gene'`` embeddings of each spot.
        """
        raise NotImplementedError(f"{type(self).__name__} does not embed spots.")

    def input_keys(self, image_key: str) -> tuple[str, ...]:
        """``obsm`` keys of per-spot features the method reads besides ``image_key``.

        The runner checks them like the image features (no representation fitted over all spots)
        and copies them into every AnnData the method receives.

        Parameters
        ----------
        image_key
            The run's image feature key.

        Returns
        -------
        The keys (none by default).
        """
        return ()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


def training_log1p(adata: AnnData, ctx: FoldContext) -> np.ndarray:
    """``log1p`` CP10k of ``adata``'s counts over ``ctx.genes`` (library size over those genes), dense."""
    a = adata if adata.var_names.equals(ctx.genes) else adata[:, ctx.genes]
    return log_normalize(a.layers[ctx.layer])


def smooth_over_neighbors(adata: AnnData, z: np.ndarray, rounds: int, *, library_key: str | None,
                          n_neighs: int = 6) -> np.ndarray:
    """Average ``z`` ``rounds`` times over each spot and its ``n_neighs`` nearest spots of the same section.

    The graph is :func:`imagene.pp.niches` on the spot centres of ``adata`` (built on a light copy:
    the user's AnnData is not touched) and the operator :func:`imagene.pp.niche_mean_operator`.
    """
    if rounds == 0:
        return z
    import pandas as pd

    from imagene.pp import niche_mean_operator, niches

    a = AnnData(obs=pd.DataFrame(index=adata.obs_names.copy()))
    a.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64)[:, :2]
    lib = None
    if library_key is not None and library_key in adata.obs:
        lib = library_key
        a.obs[lib] = pd.Categorical(adata.obs[lib].astype(str).to_numpy())
    niches(a, n_neighs=n_neighs, library_key=lib, niche_expression=False, key_added="smooth")
    op = niche_mean_operator(a.obsp["smooth_connectivities"])
    z = np.asarray(z, dtype=np.float64)
    for _ in range(rounds):
        z = np.asarray(op @ z)
    return z


def check_smooth(smooth) -> int:
    if isinstance(smooth, bool) or not isinstance(smooth, (int, np.integer)) or smooth < 0:
        raise ValueError(f"smooth must be a number of neighbour-averaging rounds (0, 1, 2, ...); got {smooth!r}.")
    return int(smooth)


class ImageneModel(Method):
    """Any imagene alignment model (``setup_anndata`` / ``train`` / ``predict_expression`` / latents) as a method.

    ``fit`` registers the training spots (``layer``, ``image_key`` and, with several training
    sections, ``library_key`` so that training validates and stops early on a held-out TRAINING
    section), builds the model with ``model_kwargs`` (its defaults otherwise) and trains it for at
    most ``ctx.max_epochs`` epochs. Expression is the model's query-reference prediction;
    embeddings are its latents.

    Parameters
    ----------
    model_cls
        The model class; ``None`` for :class:`imagene.model.UMPIRE`.
    name
        Name in the results (default: the class name in lower case).
    model_kwargs
        Passed to the model's constructor.
    train_kwargs
        Passed to ``model.train`` (``max_epochs`` defaults to ``ctx.max_epochs``).
    k
        Reference neighbours for ``predict_expression``.
    weighting
        Weighting of the neighbours (``'similarity'``, ``'softmax'``, ``'uniform'``).
    tasks
        Tasks to take part in.
    clustering_modalities
        Latents clustered in the clustering task.
    predictions
        Several predictions of one trained model, scored as ``name[key]``: a mapping of result key
        to extra arguments of ``model.predict_expression`` (e.g. ``{"reference": {}, "probe":
        {"method": "probe"}}`` for :class:`imagene.model.STAlign`; with ``{"method": "head"}``
        the ridge head of :meth:`imagene.model.AlignmentMixin.fit_expression_head` is fitted after
        training). ``None``: one prediction, scored as ``name``.
    smooth
        Rounds of averaging the clustered latents over each spot and its 6 nearest spots of the
        same section (:func:`smooth_over_neighbors`), as the smoothed baselines of the clustering task.
    image_input
        ``obsm`` key the model reads instead of the run's image features (``'{image_key}'`` in it
        is replaced by the run's key, e.g. ``'{image_key}_context'`` for the context matrix of
        :func:`imagene.bench.read_sections` with ``context=True``); ``None``: the run's key. The
        runner skips a default method whose input is missing.
    head_features
        ``obsm`` key of the features of the ridge head (``features_key`` of
        :meth:`imagene.model.AlignmentMixin.fit_expression_head`; ``'{image_key}'`` replaced as
        in ``image_input``); ``None``: the model's image input. Used by a ``{"method": "head"}``
        prediction.

    Examples
    --------
    >>> umpire = imagene.bench.ImageneModel()  # ig.model.UMPIRE with its defaults
    >>> df = imagene.bench.run(adata, methods=[umpire, imagene.bench.RidgeProbe()])
    """

    def __init__(
        self,
        model_cls: type | None = None,
        *,
        name: str | None = None,
        model_kwargs: dict[str, Any] | None = None,
        train_kwargs: dict[str, Any] | None = None,
        k: int = 50,
        weighting: str = "similarity",
        tasks: Sequence[str] = TASKS,
        clustering_modalities: Sequence[str] = ("joint", "image"),
        predictions: dict[str, dict[str, Any]] | None = None,
        smooth: int = 0,
        image_input: str | None = None,
        head_features: str | None = None,
    ) -> None:
        if model_cls is None:
            from imagene.model import UMPIRE

            model_cls = UMPIRE
        self.model_cls = model_cls
        self.name = name or model_cls.__name__.lower()
        self.model_kwargs = dict(model_kwargs or {})
        self.train_kwargs = dict(train_kwargs or {})
        self.k = int(k)
        self.weighting = weighting
        self.tasks = tuple(tasks)
        self.clustering_modalities = tuple(clustering_modalities)
        self.predictions = None if predictions is None else {str(k): dict(v) for k, v in predictions.items()}
        self.smooth = check_smooth(smooth)
        self.image_input = image_input
        self.head_features = head_features
        self.model_ = None

    def input_keys(self, image_key: str) -> tuple[str, ...]:
        """The keys of ``image_input`` and ``head_features`` (``'{image_key}'`` replaced); ``()`` without either.

        Arguments as in :meth:`Method.input_keys`.
        """
        keys = [k.replace("{image_key}", image_key) for k in (self.image_input, self.head_features) if k]
        return tuple(dict.fromkeys(keys))

    def _image_key(self, ctx: FoldContext) -> str:
        return self.image_input.replace("{image_key}", ctx.image_key) if self.image_input else ctx.image_key

    def fit(self, train: AnnData, *, ctx: FoldContext) -> None:
        """Register, build and train the model on the training spots (see the class docstring).

        Arguments as in :meth:`Method.fit`; returns nothing; the trained model is ``self.model_``.
        """
        self.ctx_ = ctx
        n_sections = train.obs[ctx.library_key].nunique()
        library_key = ctx.library_key if n_sections > 1 else None
        self.model_cls.setup_anndata(train, layer=ctx.layer, image_key=self._image_key(ctx), library_key=library_key)
        model = self.model_cls(train, **self.model_kwargs)
        kwargs = {"max_epochs": ctx.max_epochs, "enable_progress_bar": False, **self.train_kwargs}
        model.train(**kwargs)
        if any(extra.get("method") == "head" for extra in (self.predictions or {}).values()):
            features = self.head_features.replace("{image_key}", ctx.image_key) if self.head_features else None
            model.fit_expression_head(features_key=features)
        self.model_ = model
        self.genes_ = list(train.var_names)  # what the runner scores (AlignST's own genes are its seen genes)

    def _model(self):
        if self.model_ is None:
            raise RuntimeError(f"Method {self.name!r} is not fitted; the runner calls fit() first.")
        return self.model_

    def predict_expression(self, test: AnnData) -> np.ndarray:
        """Query-reference prediction from the image features of ``test``.

        Arguments as in :meth:`Method.predict_expression`; returns the (n_test, n_genes) ``log1p`` CP10k predictions; with ``predictions``, a dict of them by result key.
        """
        model = self._model()

        def predict(**extra: Any) -> np.ndarray:
            kw = {"k": self.k, "weighting": self.weighting, "return_numpy": True, **extra}
            if list(model.gene_names) != getattr(self, "genes_", list(model.gene_names)):
                kw.setdefault("gene_list", self.genes_)
            return np.asarray(model.predict_expression(test, **kw))

        if self.predictions is None:
            return predict()
        return {key: predict(**extra) for key, extra in self.predictions.items()}

    def embed(self, adata: AnnData, modality: str) -> np.ndarray:
        """The model's L2-normalised latent of ``adata`` in ``modality``.

        Arguments as in :meth:`Method.embed`; returns an (n_obs, n_latent) array.
        """
        z = np.asarray(self._model().get_latent_representation(adata, modality=modality))
        return smooth_over_neighbors(adata, z, self.smooth, library_key=self.ctx_.library_key)

    def __repr__(self) -> str:
        return f"ImageneModel({self.model_cls.__name__}, name={self.name!r})"


def umpire_context(**kwargs: Any) -> ImageneModel:
    """UMPIRE on the context matrix, its image tower a :class:`imagene.nn.ContextTower` (``image_context='attention'``).

    The same model and training as the default ``umpire`` method, UMPIRE's defaults otherwise.
    Two predictions are scored: ``umpire_context[reference]`` (query-reference retrieval, as
    ``umpire``) and ``umpire_context[head]`` (the ridge head of
    :meth:`imagene.model.AlignmentMixin.fit_expression_head` on the context matrix and the image
    latent, its rank and centring chosen on held-out training sections). The image input is
    ``obsm['<image_key>_context']`` (the spot tile, larger tiles around it and the neighbours'
    mean, :func:`imagene.pp.context_matrix`; built by :func:`imagene.bench.read_sections` with
    ``context=True`` and ``imagene bench --context``).
    It runs only when that matrix exists, like :class:`imagene.bench.ContextRidge`.

    Parameters
    ----------
    **kwargs
        Override :class:`ImageneModel` arguments; ``model_kwargs`` are merged into
        ``{"image_context": "attention"}``.

    Returns
    -------
    The method, named ``'umpire_context'``.

    Examples
    --------
    >>> adata = imagene.bench.read_sections("../shared/data/her2st", ["B4", "C2", "C3", "C4"], context=True)
    >>> imagene.bench.run(adata, methods=[imagene.bench.ImageneModel(), imagene.bench.umpire_context()])
    """
    config: dict[str, Any] = {
        "name": "umpire_context",
        "image_input": "{image_key}" + CONTEXT_SUFFIX,
        "tasks": ("expression", "retrieval"),
        "clustering_modalities": (),
        "predictions": {"reference": {}, "head": {"method": "head"}},
    }
    config.update({k: v for k, v in kwargs.items() if k != "model_kwargs"})
    config["model_kwargs"] = {"image_context": "attention", **(kwargs.get("model_kwargs") or {})}
    return ImageneModel(**config)


def bleep_style(**kwargs: Any) -> ImageneModel:
    """BLEEP-style retrieval (Xie et al., NeurIPS 2023) as a configuration of UMPIRE's shared parts.

    The same two towers and symmetric contrastive loss as :class:`imagene.model.UMPIRE`
    (:class:`imagene.module.UMPIREModule`, :func:`imagene.nn.info_nce`), configured as BLEEP:
    a fixed temperature of 1 (BLEEP's CLIP temperature; UMPIRE learns it from 0.07), 256-wide
    projections with dropout 0.1 (UMPIRE: 64-wide latent, dropout 0.5), lr 1e-3 and weight decay
    1e-3 (UMPIRE: 3e-4 and 0.05), and a prediction that is the plain average of the top-50
    reference spots (UMPIRE weights them by similarity). Unlike the original, the image side is
    an MLP on frozen tile features (BLEEP fine-tunes a ResNet-50 on the tiles) and the loss uses
    hard InfoNCE targets (BLEEP softens them with image-image and spot-spot similarities).

    Parameters
    ----------
    **kwargs
        Override :class:`ImageneModel` arguments (``k``, ``name``, ...); ``model_kwargs`` and
        ``train_kwargs`` are merged into the configuration above.

    Returns
    -------
    The method, named ``'bleep_style'``.

    Examples
    --------
    >>> imagene.bench.run(adata, methods=[imagene.bench.bleep_style()])
    """
    config: dict[str, Any] = {
        "name": "bleep_style",
        "model_kwargs": {
            "n_latent": 256,
            "n_hidden": 256,
            "n_layers": 1,
            "dropout": 0.1,
            "temperature": 1.0,
            "learn_temperature": False,
        },
        "train_kwargs": {"lr": 1e-3, "weight_decay": 1e-3},
        "k": 50,
        "weighting": "uniform",
        "tasks": ("expression", "retrieval"),
        "clustering_modalities": (),
    }
    for key in ("model_kwargs", "train_kwargs"):  # overrides refine the configuration rather than replace it
        config[key] = {**config[key], **(kwargs.pop(key, None) or {})}
    config.update(kwargs)
    return ImageneModel(**config)
