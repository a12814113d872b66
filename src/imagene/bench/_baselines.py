"""Baselines of the benchmark: the HEST probe, an ST-Net-style head, floors, and clustering references."""

from __future__ import annotations

import logging
import zlib

import numpy as np
from anndata import AnnData

from imagene._utils import log_normalize
from imagene.bench._methods import FoldContext, Method, check_smooth, smooth_over_neighbors, training_log1p
from imagene.model._head import ridge_pipeline as _ridge_pipeline
from imagene.pp import CONTEXT_SUFFIX

logger = logging.getLogger("imagene")


def ridge_probe(
    x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, n_components: int = 256, seed: int = 0
) -> np.ndarray:
    """Deprecated alias of :meth:`imagene.bench.RidgeProbe.fit_predict` (FutureWarning).

    Parameters
    ----------
    x_train, y_train, x_test
        As :meth:`imagene.bench.RidgeProbe.fit_predict`.
    n_components
        PCA components.
    seed
        Seed of the PCA solver.

    Returns
    -------
    (n_test, n_genes) predictions.
    """
    import warnings

    warnings.warn(
        "imagene.bench.ridge_probe(x_train, y_train, x_test) is deprecated; use "
        "imagene.bench.RidgeProbe(n_components).fit_predict(x_train, y_train, x_test, seed=seed).",
        FutureWarning,
        stacklevel=2,
    )
    return RidgeProbe(n_components=n_components).fit_predict(x_train, y_train, x_test, seed=seed)


class _Regressor(Method):
    """Expression regressors; for retrieval they embed a spot's image as its predicted expression.

    The image embedding is the predicted ``log1p`` CP10k of the training HVGs, the gene embedding
    the measured one, both standardised with the training mean and standard deviation: retrieval
    then asks whether the predicted profile finds the measured one.
    """

    tasks = ("expression", "retrieval")

    def _fit_targets(self, train: AnnData, ctx: FoldContext) -> np.ndarray:
        y = training_log1p(train, ctx)
        self.ctx_ = ctx
        self.mean_ = y.mean(0)
        sd = y[:, ctx.hvg].std(0)
        self.hvg_sd_ = np.where(sd > 0, sd, 1.0)
        return y

    def embed(self, adata: AnnData, modality: str) -> np.ndarray:
        """Standardised predicted (``'image'``) or measured (``'gene'``) expression of the training HVGs.

        Arguments as in :meth:`Method.embed`; returns an (n_obs, n_hvg) array.
        """
        ctx = self.ctx_
        if modality == "image":
            y = self.predict_expression(adata)
        elif modality == "gene":
            y = training_log1p(adata, ctx)
        else:
            raise ValueError(f"{self.name} embeds 'image' or 'gene'; got {modality!r}.")
        return (y[:, ctx.hvg] - self.mean_[ctx.hvg]) / self.hvg_sd_


class RidgeProbe(_Regressor):
    """The HEST-Benchmark probe on frozen tile features: StandardScaler → PCA(256) → ridge.

    Targets are ``log1p`` CP10k of every training gene; scaler, PCA and penalty are fitted on the
    fold's training spots only. :meth:`fit_predict` is the same probe on arrays, outside the runner.

    Parameters
    ----------
    n_components
        PCA components.

    Examples
    --------
    >>> imagene.bench.run(adata, methods=[imagene.bench.RidgeProbe()])
    """

    name = "ridge_probe"

    def __init__(self, n_components: int = 256) -> None:
        self.n_components = int(n_components)

    def fit(self, train: AnnData, *, ctx: FoldContext) -> None:
        """Fit scaler, PCA and ridge on the training spots.

        Arguments as in :meth:`Method.fit`; returns nothing.
        """
        y = self._fit_targets(train, ctx)
        x = np.asarray(train.obsm[self._key(ctx)], dtype=np.float64)
        self.probe_ = _ridge_pipeline(x.shape[0], x.shape[1], n_components=self.n_components, seed=ctx.seed)
        self.probe_.fit(x, y)

    def _key(self, ctx: FoldContext) -> str:
        return ctx.image_key

    def fit_predict(self, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, *, seed: int = 0) -> np.ndarray:
        """The probe on arrays, outside the runner: fit on ``(x_train, y_train)``, predict ``x_test``.

        The ridge penalty is chosen by efficient leave-one-out cross-validation on the training
        spots (one penalty for all genes, from 13 values between 0.1 and 1e5).

        Parameters
        ----------
        x_train
            (n_train, d) frozen image features of the training spots.
        y_train
            (n_train, n_genes) training targets (``log1p`` CP10k).
        x_test
            (n_test, d) features of the held-out spots.
        seed
            Seed of the PCA solver.

        Returns
        -------
        (n_test, n_genes) predictions.

        Examples
        --------
        >>> x = train.obsm["X_he_efficientnet_lite0"]
        >>> pred = imagene.bench.RidgeProbe().fit_predict(x, y_train, test.obsm["X_he_efficientnet_lite0"])
        """
        probe = _ridge_pipeline(x_train.shape[0], x_train.shape[1], n_components=self.n_components, seed=seed)
        probe.fit(x_train, y_train)
        return probe.predict(x_test)

    def predict_expression(self, test: AnnData) -> np.ndarray:
        """Ridge predictions from the image features.

        Arguments as in :meth:`Method.predict_expression`; returns an (n_test, n_genes) array.
        """
        return self.probe_.predict(np.asarray(test.obsm[self._key(self.ctx_)], dtype=np.float64))


class ContextRidge(RidgeProbe):
    """The ridge probe on context features: the same StandardScaler → PCA(256) → ridge as :class:`RidgeProbe`.

    Its input is a context matrix of :func:`imagene.pp.context_matrix`, by default
    ``obsm['<image_key>_context']``: e.g. the spot tile averaged over 4 flips, tiles of 224 and
    448 µm around it (:func:`imagene.pp.context_features`) and the mean spot feature of its
    nearest spots in the niche graph (:func:`imagene.pp.neighbor_features`);
    :func:`imagene.bench.read_sections` builds it with ``context=True``. Scaler, PCA and penalty
    are fitted per fold on the training spots only.

    The context features are computed before the folds, over all sections, but without test
    leakage: each block is a function of one spot's own image (its tiles) or of the images of its
    neighbours in the SAME section (the niche graph never crosses sections), with a frozen encoder
    and nothing fitted to any expression; a held-out section's context therefore depends on that
    section's image alone, as it would for a new slide.

    With ``head=True`` (named ``context_ridge_head``) it is the ridge head of the models
    (:meth:`imagene.model.AlignmentMixin.fit_expression_head`) without a model: the same pipeline
    regressing the leading principal components of the targets, optionally on section-centred
    features, rank and centring chosen by leave-one-section-out over the fold's training sections
    (:func:`imagene.model.select_ridge_head`). It tells what a model's head owes to its latent.

    Parameters
    ----------
    context_key
        ``obsm`` key of the context matrix; ``None``: ``'<image_key>_context'``.
    n_components
        PCA components.
    head
        Reduced rank and centring chosen on the training sections (see above).

    Examples
    --------
    >>> adata = imagene.bench.read_sections("../shared/data/her2st", ["B4", "C2", "C3", "C4"], context=True)
    >>> imagene.bench.run(adata, methods=[imagene.bench.RidgeProbe(), imagene.bench.ContextRidge()])
    """

    name = "context_ridge"

    def __init__(self, context_key: str | None = None, n_components: int = 256, *, head: bool = False) -> None:
        super().__init__(n_components=n_components)
        self.context_key = context_key
        self.head = bool(head)
        if self.head:
            self.name = "context_ridge_head"

    def fit(self, train: AnnData, *, ctx: FoldContext) -> None:
        """Fit the ridge (or, with ``head``, choose and fit the head) on the training spots.

        Arguments as in :meth:`Method.fit`; returns nothing.
        """
        if not self.head:
            return super().fit(train, ctx=ctx)
        from imagene.model import select_ridge_head

        y = self._fit_targets(train, ctx)
        x = np.asarray(train.obsm[self._key(ctx)], dtype=np.float64)
        self.probe_, self.validation_ = select_ridge_head(
            x, y, train.obs[ctx.library_key].astype(str).to_numpy(), seed=ctx.seed
        )
        return None

    def predict_expression(self, test: AnnData) -> np.ndarray:
        """Ridge (or head, centred per held-out section) predictions from the context matrix.

        Arguments as in :meth:`Method.predict_expression`; returns an (n_test, n_genes) array.
        """
        if not self.head:
            return super().predict_expression(test)
        x = np.asarray(test.obsm[self._key(self.ctx_)], dtype=np.float64)
        return self.probe_.predict(x, test.obs[self.ctx_.library_key].astype(str).to_numpy())

    def input_keys(self, image_key: str) -> tuple[str, ...]:
        """The context matrix key: ``(context_key,)``, by default ``('<image_key>_context',)``.

        Arguments as in :meth:`Method.input_keys`.
        """
        return (self.context_key or f"{image_key}{CONTEXT_SUFFIX}",)

    def _key(self, ctx: FoldContext) -> str:
        return self.input_keys(ctx.image_key)[0]


class STNetHead(_Regressor):
    """ST-Net-style regression (He et al., Nat Biomed Eng 2020): image encoder + linear head trained with MSE.

    ST-Net fine-tunes a DenseNet-121 on the tiles; on CPU within the benchmark's budget this
    baseline keeps the encoder frozen (the fold's frozen tile features) and trains the linear head
    on standardised features with AdamW and an MSE loss on ``log1p`` CP10k of every training gene.
    The head trains through :class:`imagene.train.RegressionTask` and :func:`imagene.train.fit`.
    It starts as the mean-expression floor (zero weights, bias = training mean) and, like
    UMPIRE, stops early on a held-out TRAINING section (the last one, sorted; 10 % of spots when
    there is one section), keeping the weights of the best validation epoch (the starting point
    included, so it never ends worse than the floor on validation). Zero initialisation and
    ``lr=1e-4`` were chosen on her2st by validation MSE with B4 and C2 for training and C3 for
    validation (a default PyTorch initialisation adds noise of the order of the signal to 10^4
    outputs; larger learning rates overshoot within one epoch).

    Parameters
    ----------
    max_epochs
        Epoch budget (``None``: ``ctx.max_epochs``).
    lr
        AdamW learning rate.
    weight_decay
        AdamW weight decay.
    batch_size
        Spots per step.
    patience
        Epochs without a better validation MSE before stopping.

    Examples
    --------
    >>> imagene.bench.run(adata, methods=[imagene.bench.STNetHead(max_epochs=50)])
    """

    name = "stnet_style"

    def __init__(
        self,
        *,
        max_epochs: int | None = None,
        lr: float = 1e-4,
        weight_decay: float = 1e-2,
        batch_size: int = 64,
        patience: int = 10,
    ) -> None:
        self.max_epochs = max_epochs
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.patience = patience

    def fit(self, train: AnnData, *, ctx: FoldContext) -> None:
        """Train the linear head with early stopping on a held-out training section.

        Arguments as in :meth:`Method.fit`; returns nothing.
        """
        import torch
        from lightning.pytorch.callbacks import EarlyStopping

        from imagene.train import RegressionTask, RestoreBestWeights, fit, tensor_loaders

        y = self._fit_targets(train, ctx).astype(np.float32)
        x = np.asarray(train.obsm[ctx.image_key], dtype=np.float32)
        sections = train.obs[ctx.library_key].astype(str).to_numpy()
        names = sorted(set(sections))
        rng = np.random.default_rng(ctx.seed)
        if len(names) > 1:
            is_val = sections == names[-1]
        else:
            is_val = np.zeros(len(x), bool)
            is_val[rng.choice(len(x), max(1, len(x) // 10), replace=False)] = True
        self.x_mean_ = x[~is_val].mean(0)
        sd = x[~is_val].std(0)
        self.x_sd_ = np.where(sd > 0, sd, 1.0).astype(np.float32)
        xs = (x - self.x_mean_) / self.x_sd_
        tr, va = np.flatnonzero(~is_val), np.flatnonzero(is_val)
        head = torch.nn.Linear(x.shape[1], y.shape[1])
        with torch.no_grad():  # start from the mean-expression floor: zero weights, bias = training mean
            head.weight.zero_()
            head.bias.copy_(torch.as_tensor(y[tr].mean(0)))
            floor = float(torch.nn.functional.mse_loss(head(torch.as_tensor(xs[va])), torch.as_tensor(y[va])))
        # the floor is the first candidate of early stopping and of the best weights, so the head never ends worse
        # than the floor on validation; an epoch counts as better when it lowers the validation MSE by 1e-6
        stop = EarlyStopping(monitor="validation_loss", mode="min", patience=self.patience, min_delta=1e-6)
        stop.best_score = torch.tensor(floor)
        best = RestoreBestWeights(monitor="validation_loss", mode="min")
        best.best, best.best_epoch = floor, -1
        best._state = {k: v.detach().clone() for k, v in head.state_dict().items()}
        task = RegressionTask(head, lr=self.lr, weight_decay=self.weight_decay)
        train_dl, val_dl = tensor_loaders(xs, y, tr, va, batch_size=self.batch_size, seed=int(ctx.seed))
        trainer = fit(
            task, train_dl, val_dl, max_epochs=int(self.max_epochs or ctx.max_epochs), accelerator="cpu", devices=1,
            enable_progress_bar=False, callbacks=[stop, best], what="the ST-Net-style head",
            check_weights_changed=False,  # ending on the floor (the starting weights) is a legitimate result
        )
        self.epochs_run_ = int(trainer.current_epoch)
        self.history_ = task.history
        self.weight_ = head.weight.detach().numpy().T.copy()
        self.bias_ = head.bias.detach().numpy().copy()
        self.best_validation_mse_ = float(best.best)

    def predict_expression(self, test: AnnData) -> np.ndarray:
        """Linear-head predictions from the image features.

        Arguments as in :meth:`Method.predict_expression`; returns an (n_test, n_genes) array.
        """
        x = (np.asarray(test.obsm[self.ctx_.image_key], dtype=np.float32) - self.x_mean_) / self.x_sd_
        return x @ self.weight_ + self.bias_


class RandomReference(Method):
    """Chance floor of query-reference prediction: each spot gets the mean of ``k`` random training spots.

    The same ``k`` as UMPIRE's retrieval, drawn uniformly instead of by similarity; for retrieval
    it embeds spots as independent Gaussian noise (chance recall, about ``k_percent / 100``).

    Parameters
    ----------
    k
        Random reference spots averaged per query.
    n_dims
        Width of the random embeddings.

    Examples
    --------
    >>> imagene.bench.run(adata, methods=[imagene.bench.RandomReference(k=50)])
    """

    name = "random_reference"
    tasks = ("expression", "retrieval")

    def __init__(self, k: int = 50, n_dims: int = 64) -> None:
        self.k = int(k)
        self.n_dims = int(n_dims)

    def fit(self, train: AnnData, *, ctx: FoldContext) -> None:
        """Store the training expression (the reference bank).

        Arguments as in :meth:`Method.fit`; returns nothing.
        """
        self.reference_ = training_log1p(train, ctx)
        self.seed_ = [int(ctx.seed), zlib.crc32(ctx.fold.encode())]  # differs between folds

    def predict_expression(self, test: AnnData) -> np.ndarray:
        """Mean of ``k`` uniformly drawn reference spots per query.

        Arguments as in :meth:`Method.predict_expression`; returns an (n_test, n_genes) array.
        """
        rng = np.random.default_rng([*self.seed_, 1])
        n_ref = self.reference_.shape[0]
        k = min(self.k, n_ref)
        idx = np.stack([rng.choice(n_ref, k, replace=False) for _ in range(test.n_obs)])
        return self.reference_[idx].mean(1)

    def embed(self, adata: AnnData, modality: str) -> np.ndarray:
        """Gaussian noise, independent between modalities.

        Arguments as in :meth:`Method.embed`; returns an (n_obs, n_dims) array.
        """
        stream = {"image": 2, "gene": 3, "joint": 4}.get(modality, 5)
        return np.random.default_rng([*self.seed_, stream]).standard_normal((adata.n_obs, self.n_dims))


class MeanExpression(Method):
    """Floor: every held-out spot gets the training mean expression.

    Its per-gene Pearson r is undefined (a constant prediction) and is reported as such; its MSE
    is the floor that a useful method must beat.

    Examples
    --------
    >>> imagene.bench.run(adata, methods=[imagene.bench.MeanExpression()])
    """

    name = "mean_expression"
    tasks = ("expression",)

    def fit(self, train: AnnData, *, ctx: FoldContext) -> None:
        """Store the training mean.

        Arguments as in :meth:`Method.fit`; returns nothing.
        """
        self.mean_ = training_log1p(train, ctx).mean(0)

    def predict_expression(self, test: AnnData) -> np.ndarray:
        """The training mean for every spot.

        Arguments as in :meth:`Method.predict_expression`; returns an (n_test, n_genes) array.
        """
        return np.tile(self.mean_, (test.n_obs, 1))


class ExpressionPCA(Method):
    """Clustering reference from expression alone: the scanpy recipe (log1p CP10k → HVGs → PCA).

    ``sc.pp.highly_variable_genes`` (seurat flavour) and ``sc.pp.pca`` are fitted on the spots given
    to ``fit``; :meth:`embed` projects any spots onto the same components.

    Parameters
    ----------
    n_top_genes
        Highly variable genes kept.
    n_comps
        Principal components.
    smooth
        Rounds of averaging the embedding over each spot and its 6 nearest spots of the same
        section (:func:`smooth_over_neighbors`): ``0`` is scanpy's recipe; ``1`` and ``2`` are the
        spatially smoothed baselines ``expression_pca_smooth1`` / ``_smooth2``.
    scale
        Scale each HVG to unit variance (``sc.pp.scale``, clipped at 10) before the PCA, as in
        scanpy's clustering tutorial; named ``expression_pca_scaled`` (``..._scaled_smooth2``, ...).

    Examples
    --------
    >>> imagene.bench.run(a1, task="clustering", methods=[imagene.bench.ExpressionPCA()])
    """

    name = "expression_pca"
    tasks = ("clustering",)
    clustering_modalities = ("gene",)

    def __init__(self, n_top_genes: int = 2000, n_comps: int = 50, smooth: int = 0, scale: bool = False) -> None:
        self.n_top_genes = int(n_top_genes)
        self.n_comps = int(n_comps)
        self.smooth = check_smooth(smooth)
        self.scale = bool(scale)
        if self.smooth or self.scale:
            self.name = "expression_pca" + ("_scaled" if self.scale else "") + (f"_smooth{self.smooth}" if self.smooth else "")

    def fit(self, train: AnnData, *, ctx: FoldContext) -> None:
        """Select HVGs and fit the PCA on the given spots.

        Arguments as in :meth:`Method.fit`; returns nothing.
        """
        import scanpy as sc

        self.ctx_ = ctx
        a = AnnData(X=training_log1p(train, ctx))
        a.var_names = ctx.genes
        sc.pp.highly_variable_genes(a, n_top_genes=min(self.n_top_genes, a.n_vars), flavor="seurat")
        a = a[:, a.var["highly_variable"].to_numpy()].copy()
        self.center_ = np.asarray(a.X).mean(0)
        sd = np.asarray(a.X).std(0, ddof=1) if self.scale else np.ones(a.n_vars)
        self.sd_ = np.where(sd > 0, sd, 1.0)
        if self.scale:
            a.X = np.clip((np.asarray(a.X) - self.center_) / self.sd_, None, 10)
        n_comps = int(min(self.n_comps, a.n_obs - 1, a.n_vars - 1))
        sc.pp.pca(a, n_comps=n_comps, random_state=ctx.seed)
        self.genes_ = a.var_names
        self.mean_ = np.asarray(a.X).mean(0)
        self.components_ = np.asarray(a.varm["PCs"])

    def embed(self, adata: AnnData, modality: str = "gene") -> np.ndarray:
        """Principal-component coordinates of the spots' expression.

        Arguments as in :meth:`Method.embed`; returns an (n_obs, n_comps) array.
        """
        if modality != "gene":
            raise ValueError(f"{self.name} embeds expression only (modality 'gene'); got {modality!r}.")
        x = log_normalize(adata[:, self.ctx_.genes].layers[self.ctx_.layer])
        x = x[:, self.ctx_.genes.get_indexer(self.genes_)]
        if self.scale:
            x = np.clip((x - self.center_) / self.sd_, None, 10)
        return smooth_over_neighbors(adata, (x - self.mean_) @ self.components_, self.smooth,
                                     library_key=self.ctx_.library_key)


class ImageFeatures(Method):
    """Clustering reference from the image alone: frozen tile features → StandardScaler → PCA.

    Used like :class:`ExpressionPCA` (``methods=[imagene.bench.ImageFeatures()]``).

    Parameters
    ----------
    n_comps
        Principal components.
    smooth
        Rounds of neighbour averaging, as for :class:`ExpressionPCA` (``image_features_smooth1`` / ``_smooth2``).
    """

    name = "image_features"
    tasks = ("clustering",)
    clustering_modalities = ("image",)

    def __init__(self, n_comps: int = 50, smooth: int = 0) -> None:
        self.n_comps = int(n_comps)
        self.smooth = check_smooth(smooth)
        if self.smooth:
            self.name = f"image_features_smooth{self.smooth}"

    def fit(self, train: AnnData, *, ctx: FoldContext) -> None:
        """Fit scaler and PCA on the given spots' features.

        Arguments as in :meth:`Method.fit`; returns nothing.
        """
        from sklearn.decomposition import PCA
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        self.ctx_ = ctx
        x = np.asarray(train.obsm[ctx.image_key], dtype=np.float64)
        n_comps = int(min(self.n_comps, x.shape[0] - 1, x.shape[1]))
        self.pipeline_ = make_pipeline(StandardScaler(), PCA(n_components=n_comps, random_state=ctx.seed)).fit(x)

    def embed(self, adata: AnnData, modality: str = "image") -> np.ndarray:
        """Principal-component coordinates of the spots' image features.

        Arguments as in :meth:`Method.embed`; returns an (n_obs, n_comps) array.
        """
        if modality != "image":
            raise ValueError(f"{self.name} embeds image features only (modality 'image'); got {modality!r}.")
        z = self.pipeline_.transform(np.asarray(adata.obsm[self.ctx_.image_key], dtype=np.float64))
        return smooth_over_neighbors(adata, z, self.smooth, library_key=self.ctx_.library_key)
