"""UMPIRE: two-tower image-gene alignment with query-reference expression prediction."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from anndata import AnnData

from imagene._constants import REGISTRY_KEYS
from imagene._utils import log_normalize, warn
from imagene._validate import check_int
from imagene.model._spot import SpotAlignmentModel
from imagene.module import UMPIREModule
from imagene.nn import nonzero_gene_means

logger = logging.getLogger("imagene")

#: how UMPIRE's image tower reads a context matrix (``None``: as plain features)
IMAGE_CONTEXTS = (None, "attention")


class UMPIRE(SpotAlignmentModel):
    """Image-gene alignment by two towers and a symmetric contrastive loss (UMPIRE).

    An image tower (an MLP on frozen tile features from ``obsm``, or a backbone on tiles) and a
    gene tower (an MLP on log-normalised counts, or a rank-token transformer, optionally
    pre-trained by masked-gene modelling with :class:`imagene.model.GeneEncoderPretrainer`) are
    projected to a shared space and aligned with a symmetric InfoNCE loss with a learnable
    temperature. Expression is predicted from the image alone by query-reference retrieval over
    the training spots (:meth:`predict_expression`).

    The variants of the UMPIRE paper (Han et al.):

    - ``mode='finetune'`` (UMPIRE-FINETUNE): every parameter trains; the towers end in MLP heads.
    - ``mode='adapter'`` (UMPIRE-ADAPTER): the gene encoder and the image backbone are frozen;
      each side gets two trainable linear layers with a ReLU (:func:`imagene.nn.adapter`).
      With frozen ``obsm`` features the image encoder is already frozen, so the image side is
      LayerNorm + adapter.
    - ``objective='rec'`` (UMPIRE-REC): no gene tower and no contrastive loss; the image
      embedding reconstructs the ``log1p`` CP10k expression of the ``n_rec_genes`` most variable
      genes (MSE). Its latent is the image embedding (``modality='joint'`` gives it too,
      ``'gene'`` is refused), its reference bank holds the training spots' image embeddings and
      early stopping watches ``validation_loss``.

    Parameters
    ----------
    adata
        AnnData registered with :meth:`setup_anndata`.
    n_latent
        Width of the shared embedding.
    n_hidden
        Hidden width of both towers.
    n_layers
        Hidden layers of both towers.
    dropout
        Dropout in both towers.
    temperature
        Initial InfoNCE temperature.
    learn_temperature
        Learn the temperature.
    image_encoder
        Registry name of a backbone applied to uint8 tiles when ``image_key`` holds tiles
        (``None`` when it holds frozen features).
    freeze_image_encoder
        Keep that backbone frozen (adapter) or fine-tune it.
    gene_encoder
        ``'mlp'`` (default) or ``'rank_transformer'`` (:func:`imagene.nn.get_gene_encoder`). Without
        weights, the rank transformer ranks genes by CP10k divided by their mean over the
        non-zero spots of ``adata``; with weights, by the corpus means stored with them.
    gene_encoder_weights
        Path of a pre-trained rank transformer (:meth:`imagene.model.GeneEncoderPretrainer.save`);
        its vocabulary and corpus means travel with it, genes of ``adata`` outside its vocabulary
        are never tokens. The file must still exist when the model is loaded again.
    mode
        ``'adapter'`` or ``'finetune'``; default ``'adapter'`` with ``gene_encoder_weights`` (the
        pre-trained encoder is kept as pre-trained and training is cheap) and ``'finetune'``
        without (a randomly initialised encoder has to learn).
    objective
        ``'contrastive'`` (default) or ``'rec'`` (UMPIRE-REC, see above).
    n_rec_genes
        Genes reconstructed by ``objective='rec'``: the most variable ``log1p`` CP10k genes of
        ``adata`` (1500 in the paper).
    gene_encoder_kwargs
        Gene encoder settings passed to :func:`imagene.nn.get_gene_encoder` (for the rank
        transformer without weights: ``n_tokens`` (128), ``d_model`` (64), ``n_layers`` (2),
        ``n_heads`` (4), ``pooling``).
    image_context
        ``None`` (default): the image tower is LayerNorm + MLP over ``obsm[image_key]``, whatever it
        holds. ``'attention'``: ``image_key`` is a context matrix of
        :func:`imagene.pp.context_matrix` (the spot's features, larger tiles around it, its
        neighbours' mean, side by side) and the image tower is a :class:`imagene.nn.ContextTower`
        (one token per block, fused by attention, starting near the spot token). Its block widths
        are read from ``adata.uns[image_key]['widths']`` (an error says so when they are missing)
        and stored with the model; a query needs the same context matrix under the same key. The
        tower's tokens are ``n_hidden`` wide with the model's ``dropout``; other settings go through
        ``image_context_kwargs={"n_layers": 2, ...}`` (passed to :class:`imagene.nn.ContextTower`).
        Recommended when the context can be built: on her2st (leave one section out, UMPIRE's
        defaults otherwise; ``imagene bench --context``) it lifts PCC HVG50 from 0.191 to 0.210
        (HEG50 0.148 to 0.180) and image→gene Recall@5 % from 0.135 to 0.171, in three of four
        folds (the cross-patient fold B4 loses). Its query-reference prediction stays below a ridge
        on the same context matrix; the ridge head (:meth:`fit_expression_head` on the context
        matrix, ``predict_expression(method='head')``) reaches 0.302, and on UMPIRE without the
        context tower 0.309 (docs/benchmark.md, "The ridge head").
    context_widths
        Block widths of the context matrix, instead of ``adata.uns[image_key]['widths']``
        (``image_context='attention'`` only).
    **module_kwargs
        Passed to :class:`imagene.module.UMPIREModule`.

    Examples
    --------
    >>> imagene.model.UMPIRE.setup_anndata(adata, layer="counts", image_key="X_he_efficientnet_lite0", library_key="section")
    >>> model = imagene.model.UMPIRE(adata)
    >>> model.train(max_epochs=50)
    >>> adata.obsm["X_imagene_joint"] = model.get_latent_representation(modality="joint")
    >>> pred = model.predict_expression(query, k=50)
    >>> # rank-token gene encoder, pre-trained weights, adapter mode
    >>> model = imagene.model.UMPIRE(adata, gene_encoder="rank_transformer", gene_encoder_weights="gene_encoder.pt")
    >>> # spatial / multi-scale context: the context matrix as image input, fused by attention
    >>> imagene.pp.context_features(adata, tile_sizes_um=[112, 224, 448])  # obsm 'X_he_efficientnet_lite0_<size>um'
    >>> imagene.pp.niches(adata, library_key="section")
    >>> keys = ["X_he_efficientnet_lite0_112um", "X_he_efficientnet_lite0_224um", "X_he_efficientnet_lite0_448um"]
    >>> imagene.pp.context_matrix(adata, keys)  # + neighbours' mean of the first: 'X_he_efficientnet_lite0_context'
    >>> imagene.model.UMPIRE.setup_anndata(adata, image_key="X_he_efficientnet_lite0_context", library_key="section")
    >>> model = imagene.model.UMPIRE(adata, image_context="attention")
    """

    _module_cls = UMPIREModule

    def __init__(
        self,
        adata: AnnData,
        n_latent: int = 64,
        n_hidden: int = 256,
        n_layers: int = 1,
        dropout: float = 0.5,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        image_encoder: str | None = None,
        freeze_image_encoder: bool = True,
        gene_encoder: str = "mlp",
        gene_encoder_weights: str | None = None,
        mode: str | None = None,
        objective: str = "contrastive",
        n_rec_genes: int = 1500,
        gene_encoder_kwargs: dict | None = None,
        image_context: str | None = None,
        context_widths: Sequence[int] | None = None,
        **module_kwargs: Any,
    ) -> None:
        from imagene.module._umpire import MODES, OBJECTIVES
        from imagene.nn import list_gene_encoders

        if gene_encoder not in list_gene_encoders():
            raise ValueError(f"Unknown gene_encoder {gene_encoder!r}; choose one of {list_gene_encoders()}.")
        if gene_encoder_weights is not None and gene_encoder != "rank_transformer":
            raise ValueError(
                "gene_encoder_weights are rank-transformer weights (GeneEncoderPretrainer.save); pass "
                "gene_encoder='rank_transformer' with them."
            )
        if mode is None:
            mode = "adapter" if gene_encoder_weights is not None else "finetune"
        if mode not in MODES:
            raise ValueError(f"mode must be one of {list(MODES)}; got {mode!r}.")
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {list(OBJECTIVES)}; got {objective!r}.")
        if objective == "rec" and gene_encoder_weights is not None:
            raise ValueError("objective='rec' has no gene tower, so gene_encoder_weights would be unused; drop them.")
        check_int("n_latent", n_latent, 1, hint="It is the width of the shared embedding: pass e.g. `n_latent=64`.")
        check_int("n_hidden", n_hidden, 1, hint="Pass a positive hidden width, e.g. `n_hidden=128`.")
        check_int("n_layers", n_layers, 0)
        super().__init__(adata)
        image_shape = self.adata_manager.get_from_registry(REGISTRY_KEYS.IMAGE_KEY).shape
        if len(image_shape) == 4 and image_encoder is None:
            raise ValueError(
                f"adata.obsm[{self.image_key!r}] holds tiles {tuple(image_shape)}: pass `image_encoder=` (e.g. 'tiny', "
                "'efficientnet_lite0') to train on tiles, or set up with frozen features from `imagene.pp.embed_tiles`."
            )
        context_widths = self._context_widths(image_context, context_widths, image_shape)
        ge_kwargs = dict(gene_encoder_kwargs or {})
        rec_genes = None
        counts = None
        if objective == "rec" or (gene_encoder == "rank_transformer" and gene_encoder_weights is None):
            counts = self.adata_manager.get_from_registry(REGISTRY_KEYS.X_KEY)
        if objective == "contrastive" and gene_encoder == "rank_transformer":
            if gene_encoder_weights is not None:
                ge_kwargs.update(weights=str(gene_encoder_weights), genes=list(self.adata.var_names))
            else:
                ge_kwargs.setdefault("gene_means", nonzero_gene_means(counts))
                ge_kwargs.setdefault("n_tokens", 128)
        if objective == "rec":
            from imagene.metrics import top_variable_genes

            n_rec = int(min(n_rec_genes, self.summary_stats.n_vars))
            if n_rec < 1:
                raise ValueError(f"n_rec_genes must be >= 1; got {n_rec_genes}.")
            rec_genes = np.sort(top_variable_genes(log_normalize(counts), n_rec))
        if mode == "adapter" and gene_encoder_weights is None and objective == "contrastive":
            warn(
                "mode='adapter' freezes a randomly initialised gene encoder; pass `gene_encoder_weights=` from "
                "GeneEncoderPretrainer, or use mode='finetune'."
            )
        self.module = self._make_module(
            n_genes=self.summary_stats.n_vars,
            n_image_features=self.summary_stats[f"n_{REGISTRY_KEYS.IMAGE_KEY}"],
            n_latent=n_latent,
            n_hidden=n_hidden,
            n_layers=n_layers,
            dropout=dropout,
            temperature=temperature,
            learn_temperature=learn_temperature,
            image_encoder=image_encoder,
            freeze_image_encoder=freeze_image_encoder,
            gene_encoder=gene_encoder,
            gene_encoder_kwargs=ge_kwargs,
            mode=mode,
            objective=objective,
            rec_genes=rec_genes,
            image_context_widths=context_widths,
            **module_kwargs,
        )
        self.rec_genes_ = None if rec_genes is None else self.adata.var_names[rec_genes].to_numpy()
        self.reference_latent_ = None
        self.reference_counts_ = None
        self._model_summary_string = (
            f"UMPIRE: {self.summary_stats.n_vars} genes, image input {self.image_key!r}, n_latent={n_latent}, "
            f"n_hidden={n_hidden}, n_layers={n_layers}, temperature={temperature}, gene_encoder={gene_encoder!r}"
            f"{' (pre-trained)' if gene_encoder_weights else ''}, mode={mode!r}, objective={objective!r}"
            f"{f', image_context={image_context!r} (blocks {context_widths})' if image_context else ''}"
        )
        self.init_params_ = self._get_init_params(locals())

    def _context_widths(self, image_context: str | None, widths: Sequence[int] | None, image_shape) -> list[int] | None:
        """The context matrix's block widths for ``image_context='attention'`` (``None`` without context)."""
        if image_context not in IMAGE_CONTEXTS:
            raise ValueError(f"image_context must be one of {list(IMAGE_CONTEXTS)}; got {image_context!r}.")
        key = self.image_key
        if image_context is None:
            if widths is not None:
                raise ValueError(
                    "context_widths are the blocks of image_context='attention'; pass that too, or drop them."
                )
            return None
        if len(image_shape) != 2:
            raise ValueError(
                f"image_context='attention' reads a context matrix of features; adata.obsm[{key!r}] holds tiles."
            )
        if widths is None:
            info = self.adata.uns.get(key)
            widths = info.get("widths") if isinstance(info, dict) else None
            if widths is None:
                raise ValueError(
                    f"image_context='attention' needs the block widths of the context matrix adata.obsm[{key!r}], but "
                    f"adata.uns[{key!r}]['widths'] is missing. Build the matrix with `imagene.pp.context_matrix` (it "
                    "writes them; `imagene.bench.read_sections(..., context=True)` calls it), set up with "
                    "`image_key=` its key, or pass `context_widths=`."
                )
        return [int(w) for w in widths]

    def _image_input(self, adata: AnnData, idx: np.ndarray) -> np.ndarray:
        widths = getattr(self.module.image_tower, "context_widths", None)
        if widths is not None and self.image_key not in adata.obsm:
            raise KeyError(
                f"adata.obsm[{self.image_key!r}] not found. This UMPIRE reads a context matrix "
                f"(image_context='attention', blocks {widths}): build it for this AnnData as for training "
                f"(`imagene.pp.context_features`, `imagene.pp.niches`, then "
                f"`imagene.pp.context_matrix(..., key_added={self.image_key!r})`, or "
                "`imagene.bench.read_sections(..., context=True)`)."
            )
        return super()._image_input(adata, idx)

    def _train_monitor(self) -> tuple[str, str]:
        return ("validation_loss", "min") if self.module.objective == "rec" else ("recall5_validation", "max")

    # ---- UMPIRE-REC has no gene tower: its latent and reference bank are image embeddings
    def _embed(self, adata: AnnData, modality: str, indices, batch_size: int) -> np.ndarray:
        if self.module.objective == "rec":
            if modality == "gene":
                raise ValueError(
                    "This UMPIRE was trained with objective='rec' (image → expression reconstruction) and has no gene "
                    "embedding; use modality='image' (or 'joint', the same embedding for this model)."
                )
            modality = "image"
        return super()._embed(adata, modality, indices, batch_size)

    def _build_reference(self, batch_size: int = 512) -> None:
        if self.module.objective != "rec":
            return super()._build_reference(batch_size)
        self.reference_latent_ = self._embed(self.adata, "image", None, batch_size).astype(np.float32)
        self._set_reference_counts(self._gene_input(self.adata))
        self._store_similarity_threshold(batch_size, exclude_self=True)
        return None
