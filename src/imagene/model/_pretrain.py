"""Masked-gene pre-training of the rank-token gene encoder (UMPIRE's gene tower), with Lightning."""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from anndata import AnnData
from torch import nn

from imagene._settings import settings
from imagene._utils import check_adata, get_counts
from imagene.nn import (
    SPECIAL_TOKENS,
    GeneVocabulary,
    RankTokenizer,
    RankTransformerGeneEncoder,
    mask_tokens,
    nonzero_gene_means,
    read_gene_encoder_file,
    save_gene_encoder,
)
from imagene.train import TaskPlan, history_frames

logger = logging.getLogger("imagene")


def _as_list(adatas: AnnData | Sequence[AnnData]) -> list[AnnData]:
    items = [adatas] if isinstance(adatas, AnnData) else list(adatas)
    if not items:
        raise ValueError("The corpus is empty; pass one AnnData or a list of AnnData with raw counts.")
    for a in items:
        check_adata(a)
    return items


def corpus_statistics(
    adatas: Sequence[AnnData], *, layer: str | None = "counts", min_spots: int = 10, target_sum: float = 1e4
) -> tuple[list[str], np.ndarray]:
    """Vocabulary genes and their non-zero CP10k means over a corpus of sections.

    Parameters
    ----------
    adatas
        Sections with raw counts (any gene panels; genes are matched by symbol).
    layer
        Layer of raw counts (``None`` for ``X``).
    min_spots
        A gene enters the vocabulary when it is detected in at least this many spots of the corpus.
    target_sum
        Library size of the CP10k normalisation (each spot normalised over its own section's genes).

    Returns
    -------
    ``(genes, means)``: genes ordered by decreasing number of spots detected (ties by name), and
    the mean CP10k of each over the spots where it is detected.
    """
    total: dict[str, float] = {}
    detected: dict[str, int] = {}
    for a in adatas:  # pooled by gene symbol: sums of CP10k and detections of each section
        sums, nnz = nonzero_gene_means(get_counts(a, layer), target_sum, return_sums=True)
        names = a.var_names.astype(str)
        s = pd.Series(sums, index=names).groupby(level=0).sum()
        n = pd.Series(nnz, index=names).groupby(level=0).sum()
        for g, v in s.items():
            total[g] = total.get(g, 0.0) + float(v)
        for g, v in n.items():
            detected[g] = detected.get(g, 0) + int(v)
    det = pd.Series(detected)
    det = det[(det >= max(1, min_spots)) & ~det.index.isin(SPECIAL_TOKENS)]
    if det.empty:
        raise ValueError(f"No gene is detected in at least {min_spots} spots of the corpus; lower `min_spots`.")
    order = pd.DataFrame({"n": det.to_numpy(), "g": det.index}).sort_values(["n", "g"], ascending=[False, True])
    genes = order["g"].tolist()
    means = np.array([total[g] / detected[g] for g in genes], dtype=np.float64)
    return genes, means


def _token_states(encoder: RankTransformerGeneEncoder, inputs: torch.Tensor) -> torch.Tensor:
    """(B, T, d) states aligned with the input tokens (the ``<cls>`` state dropped)."""
    h = encoder.encode_tokens(inputs)
    return h[:, 1:] if encoder.pooling == "cls" else h


class MaskedGeneModelling(TaskPlan):
    """Masked-gene modelling of a rank-token encoder: cross-entropy on masked tokens, masked-token accuracy.

    ``module`` holds ``encoder`` and ``mlm_head``; validation masks are fixed per batch, so
    ``mlm_accuracy_validation`` compares epochs on the same targets.
    """

    def __init__(self, encoder: RankTransformerGeneEncoder, head: nn.Module, *, mask_prob: float, **kwargs) -> None:
        super().__init__(nn.ModuleDict({"encoder": encoder, "mlm_head": head}), **kwargs)
        self.mask_prob = float(mask_prob)

    def step(self, batch, batch_idx, mode):
        (ids,) = batch
        encoder, head = self.module["encoder"], self.module["mlm_head"]
        gen = None if mode == "train" else torch.Generator().manual_seed(10_000 + batch_idx)
        inputs, labels = mask_tokens(ids, vocab_size=encoder.vocab_size, mask_prob=self.mask_prob, generator=gen)
        sel = labels != -100
        logits = head(_token_states(encoder, inputs)[sel])
        if mode == "train":
            return {"loss": F.cross_entropy(logits, labels[sel]), "n": ids.shape[0]}
        n = int(sel.sum())
        return {"n": ids.shape[0], "mlm_accuracy": (float((logits.argmax(-1) == labels[sel]).sum()) / max(n, 1), n)}


class GeneEncoderPretrainer:
    """Pre-train UMPIRE's rank-token gene encoder by masked-gene modelling (BERT-style MLM).

    The corpus (one or several sections with raw counts, any gene panels) defines the
    vocabulary (genes detected in at least ``min_spots`` spots) and each gene's mean CP10k over
    the spots where it is detected. Every spot becomes ``n_tokens`` rank tokens
    (:class:`imagene.nn.RankTokenizer`); during training 15 % of the real tokens are chosen, of
    which 80 % are replaced by ``<mask>``, 10 % by a random gene and 10 % kept
    (:func:`imagene.nn.mask_tokens`), and the encoder learns to predict the original gene ids
    (cross-entropy). Training runs with Lightning: checkpoints in ``checkpoint_dir`` and
    ``resume=True`` to continue from the last one. :meth:`save` writes the weights with the
    vocabulary and the means, so that ``UMPIRE(adata, gene_encoder="rank_transformer",
    gene_encoder_weights=path)`` ranks a query's genes exactly as in pre-training; genes of a
    query outside the vocabulary are never tokens.

    Parameters
    ----------
    adatas
        Corpus: an AnnData or a list of AnnData (sections) with raw counts.
    layer
        Layer of raw counts (``None`` for ``X``).
    n_tokens
        Tokens per spot (1500 in the UMPIRE paper; 128 here so that pre-training runs on a CPU).
    d_model, n_layers, n_heads
        Transformer width, depth (12 in the paper) and heads.
    dropout
        Dropout in the transformer.
    pooling
        ``'mean'`` or ``'cls'`` (how a spot embedding is read out; not used by the MLM loss).
    min_spots
        Minimum number of corpus spots in which a gene is detected to enter the vocabulary.
    mask_prob
        Fraction of real tokens chosen as MLM targets.

    Examples
    --------
    >>> pre = imagene.model.GeneEncoderPretrainer([sec1, sec2, sec3], layer="counts")
    >>> pre.train(max_epochs=3, checkpoint_dir="mlm_ckpt")
    >>> pre.evaluate([held_out_section])  # masked-token accuracy vs untrained and frequency baselines
    >>> pre.save("gene_encoder.pt")
    >>> model = imagene.model.UMPIRE(adata, gene_encoder="rank_transformer", gene_encoder_weights="gene_encoder.pt")
    """

    def __init__(
        self,
        adatas: AnnData | Sequence[AnnData],
        *,
        layer: str | None = "counts",
        n_tokens: int = 128,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.1,
        pooling: str = "mean",
        min_spots: int = 10,
        mask_prob: float = 0.15,
    ) -> None:
        corpus = _as_list(adatas)
        if not 0 < mask_prob < 1:
            raise ValueError(f"mask_prob must be in (0, 1); got {mask_prob}.")
        genes, means = corpus_statistics(corpus, layer=layer, min_spots=min_spots)
        self.layer = layer
        self.mask_prob = float(mask_prob)
        self.config = {"n_tokens": int(n_tokens), "d_model": int(d_model), "n_layers": int(n_layers),
                       "n_heads": int(n_heads), "dropout": float(dropout), "pooling": pooling, "target_sum": 1e4}
        self._build(GeneVocabulary(genes), means)
        self.tokens_ = self.tokenize(corpus)
        logger.info(
            "Gene-encoder corpus: %d spots from %d sections, vocabulary of %d genes, %d tokens per spot",
            self.tokens_.shape[0], len(corpus), len(genes), self.config["n_tokens"],
        )

    def _build(self, vocabulary: GeneVocabulary, means: np.ndarray) -> None:
        cfg = self.config
        self.tokenizer = RankTokenizer(vocabulary, means, n_tokens=cfg["n_tokens"], target_sum=cfg["target_sum"])
        n = len(vocabulary.genes)
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        self.encoder = RankTransformerGeneEncoder(
            n, None, vocab_size=len(vocabulary), gene_means=means, **cfg
        )
        self.mlm_head = nn.Linear(cfg["d_model"], len(vocabulary))
        self.history_: dict[str, list[float]] = {"train_loss": [], "mlm_accuracy_validation": []}
        self.epochs_trained_ = 0

    @property
    def vocabulary(self) -> GeneVocabulary:
        """The gene vocabulary (special tokens first)."""
        return self.tokenizer.vocabulary

    def tokenize(self, adatas: AnnData | Sequence[AnnData]) -> torch.Tensor:
        """Rank tokens of every spot of one or several sections, with this vocabulary and these means.

        Parameters
        ----------
        adatas
            Sections with raw counts in ``layer``.

        Returns
        -------
        (n_spots, n_tokens) int64 token ids (sections stacked in order).
        """
        out = [self.tokenizer.tokenize(get_counts(a, self.layer), list(a.var_names.astype(str)))
               for a in _as_list(adatas)]
        return torch.cat(out)

    def train(
        self,
        max_epochs: int = 5,
        *,
        corpus: AnnData | Sequence[AnnData] | None = None,
        validation: AnnData | Sequence[AnnData] | None = None,
        batch_size: int = 64,
        lr: float = 1e-3,
        weight_decay: float = 0.01,
        checkpoint_dir: str | os.PathLike | None = None,
        resume: bool = False,
        accelerator: str = "auto",
        devices: int | list[int] | str = "auto",
        enable_progress_bar: bool | None = None,
        **trainer_kwargs: Any,
    ) -> None:
        """Masked-gene modelling on the corpus with Lightning.

        Parameters
        ----------
        max_epochs
            Passes over the corpus (the total, counting resumed epochs).
        corpus
            Sections to train on instead of the corpus given at construction (e.g. after :meth:`load`);
            tokenised with this vocabulary.
        validation
            Held-out sections: ``mlm_accuracy_validation`` (fixed masks) is logged each epoch.
        batch_size
            Spots per step.
        lr, weight_decay
            AdamW settings.
        checkpoint_dir
            Folder of Lightning checkpoints (``last.ckpt`` written each epoch); ``None``: none.
        resume
            Continue from ``checkpoint_dir/last.ckpt`` (weights, optimiser and epoch) when it exists.
        accelerator, devices
            Lightning device settings.
        enable_progress_bar
            Lightning's progress bar (default: ``imagene.settings.progress_bar``).
        **trainer_kwargs
            Passed to :class:`lightning.pytorch.Trainer`.

        Returns
        -------
        Nothing; the encoder is trained in place and ``history_`` extended.
        """
        from torch.utils.data import DataLoader, TensorDataset

        from imagene.train import fit

        if corpus is not None:
            self.tokens_ = self.tokenize(corpus)
        if getattr(self, "tokens_", None) is None:
            raise ValueError("No corpus to train on: pass `corpus=` (sections with raw counts) to train().")
        task = MaskedGeneModelling(self.encoder, self.mlm_head, mask_prob=self.mask_prob, lr=lr,
                                   weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(settings.seed if settings.seed is not None else 0)
        train_dl = DataLoader(TensorDataset(self.tokens_), batch_size=batch_size, shuffle=True, num_workers=0,
                              generator=gen)
        val_dl = None
        if validation is not None:
            val_dl = DataLoader(TensorDataset(self.tokenize(validation)), batch_size=256, num_workers=0)
        if enable_progress_bar is not None:
            trainer_kwargs["enable_progress_bar"] = enable_progress_bar
        trainer = fit(
            task, train_dl, val_dl, max_epochs=max_epochs, monitor="mlm_accuracy_validation", mode="max",
            accelerator=accelerator, devices=devices, checkpoint_dir=checkpoint_dir, resume=resume,
            what="masked-gene pre-training", check_weights_changed=False, **trainer_kwargs,
        )
        self.mlm_head.eval()
        for key in ("train_loss", "mlm_accuracy_validation"):
            self.history_.setdefault(key, [])
        for key, values in task.epoch_history.items():
            self.history_.setdefault(key, []).extend(values)
        self.epochs_trained_ = int(trainer.current_epoch)

    @property
    def history(self) -> dict[str, pd.DataFrame]:
        """Per-epoch ``train_loss`` and ``mlm_accuracy_validation`` in the scvi-tools ``model.history`` format."""
        return history_frames({k: v for k, v in self.history_.items() if v})

    @torch.inference_mode()
    def _accuracy(self, encoder: nn.Module, head: nn.Module, tokens: torch.Tensor, seed: int, batch_size: int):
        encoder.eval()
        head.eval()
        hit = n = 0
        freq_hit = 0
        position_mode = self._position_mode()
        gen = torch.Generator().manual_seed(seed)
        for start in range(0, tokens.shape[0], batch_size):
            ids = tokens[start : start + batch_size]
            inputs, labels = mask_tokens(ids, vocab_size=len(self.vocabulary), mask_prob=self.mask_prob, generator=gen)
            sel = labels != -100
            pred = head(_token_states(encoder, inputs)[sel]).argmax(-1)
            hit += int((pred == labels[sel]).sum())
            pos = torch.nonzero(sel)[:, 1]
            freq_hit += int((position_mode[pos] == labels[sel]).sum())
            n += int(sel.sum())
        return hit / max(n, 1), freq_hit / max(n, 1), n

    def _position_mode(self) -> torch.Tensor:
        """Most frequent gene id at each position of the training tokens (the frequency baseline)."""
        if getattr(self, "position_mode_", None) is None:
            if getattr(self, "tokens_", None) is None:
                raise ValueError("The frequency baseline needs the training corpus; pass `corpus=` to train() first.")
            t = self.tokens_
            mode = torch.zeros(t.shape[1], dtype=torch.long)
            for j in range(t.shape[1]):  # one bincount per position (n_tokens of them), not per spot
                col = t[:, j]
                col = col[col >= len(SPECIAL_TOKENS)]
                if len(col):
                    mode[j] = torch.bincount(col, minlength=len(self.vocabulary)).argmax()
            self.position_mode_ = mode
        return self.position_mode_

    def evaluate(
        self, adatas: AnnData | Sequence[AnnData], *, seed: int = 0, batch_size: int = 256, untrained: bool = True
    ) -> dict[str, float]:
        """Masked-token accuracy on held-out sections, next to an untrained encoder and a frequency baseline.

        The same masks (fixed by ``seed``) are scored for every predictor. ``untrained`` is an
        encoder and head of the same architecture with fresh random weights; ``frequency``
        predicts, at each position, the gene most often found there in the training corpus.

        Parameters
        ----------
        adatas
            Held-out sections (never part of the training corpus).
        seed
            Seed of the masks.
        batch_size
            Spots per forward pass.
        untrained
            Also score a freshly initialised encoder.

        Returns
        -------
        ``{'pretrained': ..., 'untrained': ..., 'frequency': ..., 'n_masked': ...}``.

        Examples
        --------
        >>> pre.evaluate(held_out)["pretrained"]
        """
        tokens = self.tokenize(adatas)
        acc, freq, n = self._accuracy(self.encoder, self.mlm_head, tokens, seed, batch_size)
        out = {"pretrained": acc, "frequency": freq, "n_masked": float(n)}
        if untrained:
            torch.manual_seed(12345)
            enc = copy.deepcopy(self.encoder)
            for mod in enc.modules():
                if mod is not enc and hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()
            head = nn.Linear(self.config["d_model"], len(self.vocabulary))
            out["untrained"] = self._accuracy(enc, head, tokens, seed, batch_size)[0]
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the encoder's weights with the vocabulary, the corpus means and the MLM head.

        Parameters
        ----------
        path
            File to write (load it with :meth:`load`, or pass it to
            ``UMPIRE(..., gene_encoder_weights=path)`` / :func:`imagene.nn.load_gene_encoder`).

        Returns
        -------
        Nothing.
        """
        save_gene_encoder(
            path,
            self.encoder,
            self.tokenizer,
            extra={
                "mlm_head": {k: v.detach().cpu() for k, v in self.mlm_head.state_dict().items()},
                "history": dict(self.history_),
                "mask_prob": self.mask_prob,
                "layer": self.layer,
                "epochs_trained": self.epochs_trained_,
                "position_mode": None if getattr(self, "position_mode_", None) is None and getattr(
                    self, "tokens_", None) is None else self._position_mode(),
            },
        )

    @classmethod
    def load(cls, path: str | os.PathLike) -> GeneEncoderPretrainer:
        """Read a pre-trainer written by :meth:`save` (no corpus: pass ``corpus=`` to :meth:`train` to continue).

        Parameters
        ----------
        path
            The weights file.

        Returns
        -------
        The pre-trainer with its encoder, head, vocabulary, means and history.

        Examples
        --------
        >>> pre = imagene.model.GeneEncoderPretrainer.load("gene_encoder.pt")
        """
        payload = read_gene_encoder_file(path)
        self = cls.__new__(cls)
        self.layer = payload.get("layer", "counts")
        self.mask_prob = float(payload.get("mask_prob", 0.15))
        self.config = dict(payload["config"])
        self._build(GeneVocabulary(payload["vocabulary"]), np.asarray(payload["gene_means"]))
        self.encoder.load_state_dict(payload["state_dict"], strict=False)
        if "mlm_head" in payload:
            self.mlm_head.load_state_dict(payload["mlm_head"])
        self.history_ = {k: list(v) for k, v in payload.get("history", self.history_).items()}
        self.epochs_trained_ = int(payload.get("epochs_trained", 0))
        self.tokens_ = None
        self.position_mode_ = payload.get("position_mode")
        self.encoder.eval()
        self.mlm_head.eval()
        return self

    def __repr__(self) -> str:
        cfg = self.config
        return (
            f"GeneEncoderPretrainer({len(self.vocabulary.genes)} genes, n_tokens={cfg['n_tokens']}, "
            f"d_model={cfg['d_model']}, n_layers={cfg['n_layers']}, epochs trained={self.epochs_trained_})"
        )
