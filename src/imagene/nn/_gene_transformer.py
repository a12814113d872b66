"""Rank-token gene encoder (UMPIRE / Geneformer style): vocabulary, tokenizer, transformer, masking, registry.

A spot's expression becomes a sentence of gene tokens: counts are normalised per spot (counts per
10k), divided by each gene's mean over a pre-training corpus (so that ubiquitous housekeeping
genes do not always come first), sorted in descending order, and the top ``n_tokens`` expressed
genes are kept as token ids. The order carries the expression; a position embedding gives the
transformer the rank.

Nothing here imports anndata.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from imagene.nn._mlp import MLP, GeneMLPEncoder

logger = logging.getLogger("imagene")

#: special tokens, always the first ids of a vocabulary
PAD, MASK, CLS, UNK = "<pad>", "<mask>", "<cls>", "<unk>"
#: the special tokens in id order (padding, mask, class, unknown)
SPECIAL_TOKENS = (PAD, MASK, CLS, UNK)
PAD_ID, MASK_ID, CLS_ID, UNK_ID = 0, 1, 2, 3
#: format tag of the files written by :func:`save_gene_encoder`
WEIGHTS_FORMAT = "imagene.rank_transformer/1"


class GeneVocabulary:
    """Gene symbols and special tokens (``<pad>``, ``<mask>``, ``<cls>``, ``<unk>``) mapped to token ids.

    The special tokens take ids 0-3, genes follow in the given order. Lookups are by exact
    symbol; genes not in the vocabulary get ``-1`` from :meth:`ids` (the tokenizer drops them).

    Parameters
    ----------
    genes
        Unique gene symbols.

    Examples
    --------
    >>> vocab = GeneVocabulary(["ERBB2", "KRT19", "ACTB"])
    >>> vocab.ids(["ACTB", "NOT_A_GENE"]).tolist()
    [6, -1]
    """

    def __init__(self, genes: Sequence[str]) -> None:
        genes = [str(g) for g in genes]
        if len(set(genes)) != len(genes):
            raise ValueError("Gene symbols of a vocabulary must be unique; make them unique before building it.")
        clash = set(genes) & set(SPECIAL_TOKENS)
        if clash:
            raise ValueError(f"Gene symbols {sorted(clash)} collide with special tokens; rename those genes.")
        self.genes = genes
        self.tokens = [*SPECIAL_TOKENS, *genes]
        self._index = {g: i for i, g in enumerate(self.tokens)}

    def __len__(self) -> int:
        return len(self.tokens)

    def __contains__(self, gene: object) -> bool:
        return gene in self._index and gene not in SPECIAL_TOKENS

    def ids(self, genes: Sequence[str]) -> np.ndarray:
        """Token id of each gene (``-1`` for genes not in the vocabulary).

        Parameters
        ----------
        genes
            Gene symbols.

        Returns
        -------
        (len(genes),) int64 array.
        """
        return np.array([self._index.get(str(g), -1) if str(g) not in SPECIAL_TOKENS else -1 for g in genes],
                        dtype=np.int64)

    def __repr__(self) -> str:
        return f"GeneVocabulary({len(self.genes)} genes + {len(SPECIAL_TOKENS)} special tokens)"


def rank_tokens(
    counts: torch.Tensor,
    gene_ids: torch.Tensor,
    gene_scale: torch.Tensor,
    n_tokens: int,
    *,
    target_sum: float = 1e4,
) -> torch.Tensor:
    """Rank tokens of a batch of spots (vectorised: one ``topk`` per batch).

    Parameters
    ----------
    counts
        (B, G) raw counts over G input genes.
    gene_ids
        (G,) token id of each input gene; ``-1`` marks genes outside the vocabulary (never tokens).
    gene_scale
        (G,) factor applied after CP10k normalisation (``1 / corpus mean`` of each gene).
    n_tokens
        Tokens per spot (the top ``n_tokens`` expressed genes).
    target_sum
        Library size after normalisation.

    Returns
    -------
    (B, n_tokens) int64 token ids, highest normalised expression first, ``PAD_ID`` after the last
    expressed gene. Ties are broken by input order (deterministic).
    """
    x = counts.float()
    lib = x.sum(1, keepdim=True).clamp(min=1.0)
    v = x / lib * target_sum * gene_scale.to(x.dtype)
    known = gene_ids >= 0
    v = torch.where(known.unsqueeze(0) & (x > 0), v, torch.full_like(v, -1.0))
    k = int(min(n_tokens, v.shape[1]))
    # a stable sort breaks ties by input order (topk does not guarantee any order among ties)
    top_v, top_i = torch.sort(v, dim=1, descending=True, stable=True)
    top_v, top_i = top_v[:, :k], top_i[:, :k]
    ids = gene_ids[top_i]
    ids = torch.where(top_v > 0, ids, torch.full_like(ids, PAD_ID))
    if k < n_tokens:
        ids = torch.cat([ids, ids.new_full((ids.shape[0], n_tokens - k), PAD_ID)], dim=1)
    return ids


class RankTokenizer:
    """Turn raw counts into rank tokens with a vocabulary and per-gene corpus means.

    Parameters
    ----------
    vocabulary
        The gene vocabulary.
    gene_means
        (len(vocabulary.genes),) mean of each gene's CP10k expression over the spots of the
        corpus in which it is detected (non-zero); genes are ranked by CP10k divided by it.
    n_tokens
        Tokens per spot.
    target_sum
        Library size after normalisation.

    Examples
    --------
    >>> tok = RankTokenizer(GeneVocabulary(["A", "B", "C"]), np.ones(3), n_tokens=2)
    >>> tok.tokenize(np.array([[1, 5, 0]]), ["A", "B", "C"]).tolist()
    [[5, 4]]
    """

    def __init__(
        self, vocabulary: GeneVocabulary, gene_means: np.ndarray, *, n_tokens: int = 256, target_sum: float = 1e4
    ) -> None:
        gene_means = np.asarray(gene_means, dtype=np.float64).ravel()
        if gene_means.shape[0] != len(vocabulary.genes):
            raise ValueError(
                f"gene_means has {gene_means.shape[0]} values for {len(vocabulary.genes)} vocabulary genes; give one "
                "mean per gene, in vocabulary order."
            )
        if not np.all(np.isfinite(gene_means)) or (gene_means <= 0).any():
            raise ValueError("gene_means must be positive and finite (a gene never detected has no mean: leave it out).")
        if n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1; got {n_tokens}.")
        self.vocabulary = vocabulary
        self.gene_means = gene_means
        self.n_tokens = int(n_tokens)
        self.target_sum = float(target_sum)

    def input_maps(self, genes: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Token id and scale (``1 / mean``) of each input gene (``-1`` and 0 for genes outside the vocabulary).

        Parameters
        ----------
        genes
            Symbols of the count matrix's columns.

        Returns
        -------
        ``(gene_ids, gene_scale)``, both of length ``len(genes)``.
        """
        ids = self.vocabulary.ids(genes)
        scale = np.zeros(len(ids), dtype=np.float32)
        known = ids >= 0
        scale[known] = 1.0 / self.gene_means[ids[known] - len(SPECIAL_TOKENS)]
        if not known.any():
            raise ValueError(
                "None of the input genes is in the gene vocabulary; check that var_names are gene symbols of the "
                "same species and naming as the pre-training corpus."
            )
        n_unknown = int((~known).sum())
        if n_unknown:
            logger.debug("%d of %d genes are not in the gene vocabulary and are never tokens", n_unknown, len(ids))
        return ids, scale

    def tokenize(self, counts: Any, genes: Sequence[str], *, batch_size: int = 1024) -> torch.Tensor:
        """Rank tokens of every spot (rows of ``counts``).

        Parameters
        ----------
        counts
            (n, len(genes)) raw counts (NumPy, SciPy sparse or torch).
        genes
            Column symbols.
        batch_size
            Spots densified at a time.

        Returns
        -------
        (n, n_tokens) int64 token ids.
        """
        import scipy.sparse as sp

        ids, scale = self.input_maps(genes)
        ids_t, scale_t = torch.as_tensor(ids), torch.as_tensor(scale)
        n = counts.shape[0]
        out = []
        for start in range(0, n, batch_size):
            block = counts[start : start + batch_size]
            block = block.toarray() if sp.issparse(block) else np.asarray(block)
            out.append(rank_tokens(torch.as_tensor(block, dtype=torch.float32), ids_t, scale_t, self.n_tokens,
                                   target_sum=self.target_sum))
        return torch.cat(out) if out else torch.zeros((0, self.n_tokens), dtype=torch.long)


def nonzero_gene_means(
    counts: Any, target_sum: float = 1e4, *, return_sums: bool = False
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """Mean CP10k expression of each gene over the spots where it is detected (1 for never-detected genes).

    The rank tokenizer divides a spot's CP10k by these means before sorting genes
    (:class:`RankTokenizer`); the pre-trainer pools the sums of several sections
    (:class:`imagene.model.GeneEncoderPretrainer`).

    Parameters
    ----------
    counts
        (n_obs, n_genes) raw counts (dense or sparse); each spot is normalised over these genes.
    target_sum
        Library size after normalisation.
    return_sums
        Return ``(sum of CP10k, number of spots detected)`` per gene instead of their ratio.

    Returns
    -------
    (n_genes,) float64 means, or the two (n_genes,) arrays with ``return_sums=True``.

    Examples
    --------
    >>> nonzero_gene_means(np.array([[1, 0], [3, 2]]))
    array([8000., 4000.])
    """
    import scipy.sparse as sp

    x = sp.csr_matrix(counts, dtype=np.float64)
    lib = np.asarray(x.sum(1)).ravel()
    lib[lib == 0] = 1.0
    x = sp.diags(target_sum / lib) @ x
    nnz = np.asarray((x > 0).sum(0)).ravel()
    total = np.asarray(x.sum(0)).ravel()
    if return_sums:
        return total, nnz
    return np.where(nnz > 0, total / np.maximum(nnz, 1), 1.0)


def mask_tokens(
    ids: torch.Tensor,
    *,
    vocab_size: int,
    mask_prob: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking of gene tokens: choose 15 % of the real (non-special) tokens as targets.

    Of the chosen tokens, 80 % become ``<mask>``, 10 % a random gene and 10 % stay unchanged.

    Parameters
    ----------
    ids
        (B, T) token ids.
    vocab_size
        Size of the vocabulary (random replacements are drawn among the genes).
    mask_prob
        Fraction of real tokens chosen as targets.
    generator
        Torch random generator (fixed masks for evaluation).

    Returns
    -------
    ``(inputs, labels)``: the corrupted ids, and the original id at chosen positions with ``-100``
    elsewhere (ignored by :func:`torch.nn.functional.cross_entropy`).

    Examples
    --------
    >>> inputs, labels = mask_tokens(torch.randint(4, 100, (8, 32)), vocab_size=100)
    """
    if not 0 < mask_prob < 1:
        raise ValueError(f"mask_prob must be in (0, 1); got {mask_prob}.")
    real = ids >= len(SPECIAL_TOKENS)
    u = torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)
    chosen = real & (u < mask_prob)
    labels = torch.where(chosen, ids, torch.full_like(ids, -100))
    action = torch.rand(ids.shape, generator=generator, device="cpu").to(ids.device)
    random_ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, ids.shape, generator=generator, device="cpu").to(
        ids.device
    )
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(ids, MASK_ID), ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, labels


class RankTransformerGeneEncoder(nn.Module):
    """Gene tower on rank tokens: token + position embeddings, a Transformer encoder, pooling, a head.

    Takes raw counts (B, n_genes) over a fixed list of input genes and returns (B, n_output).
    Each input gene's token id and corpus mean are buffers (``gene_ids``, ``gene_scale``), so the
    same weights serve any gene panel: genes outside the vocabulary are never tokens.

    Parameters
    ----------
    n_genes
        Number of input genes (columns of the counts).
    n_output
        Output width; ``None`` returns the pooled ``d_model`` features (no head).
    vocab_size
        Size of the token vocabulary (genes + 4 special tokens). Default: ``n_genes + 4`` with the
        input genes as the vocabulary.
    gene_ids
        (n_genes,) token id per input gene (``-1``: not in the vocabulary). Default: ``4, 5, ...``.
    gene_means
        (n_genes,) corpus mean of each input gene's CP10k expression (default: 1 for every gene,
        i.e. ranking by CP10k alone).
    n_tokens
        Tokens per spot (1500 in the UMPIRE paper; 256 here so it runs on CPU).
    d_model, n_layers, n_heads
        Transformer width, depth (12 in the paper) and heads.
    dropout
        Dropout in the transformer and the head.
    pooling
        ``'mean'`` over real tokens or ``'cls'`` (a ``<cls>`` token prepended).
    n_hidden, n_head_layers
        Hidden width and hidden layers of the MLP head (when ``n_output`` is given).
    target_sum
        Library size of the CP10k normalisation.

    Examples
    --------
    >>> enc = RankTransformerGeneEncoder(2000, 64)
    >>> enc(torch.poisson(torch.rand(8, 2000))).shape
    torch.Size([8, 64])
    """

    def __init__(
        self,
        n_genes: int,
        n_output: int | None = None,
        *,
        vocab_size: int | None = None,
        gene_ids: Any = None,
        gene_means: Any = None,
        n_tokens: int = 256,
        d_model: int = 64,
        n_layers: int = 2,
        n_heads: int = 4,
        dropout: float = 0.1,
        pooling: str = "mean",
        n_hidden: int = 256,
        n_head_layers: int = 1,
        target_sum: float = 1e4,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls'; got {pooling!r}.")
        if d_model % n_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        if gene_ids is None:
            gene_ids = np.arange(len(SPECIAL_TOKENS), len(SPECIAL_TOKENS) + n_genes)
        gene_ids = torch.as_tensor(np.asarray(gene_ids), dtype=torch.long)
        if gene_ids.shape != (n_genes,):
            raise ValueError(f"gene_ids must have one id per input gene ({n_genes}); got shape {tuple(gene_ids.shape)}.")
        vocab_size = int(vocab_size if vocab_size is not None else n_genes + len(SPECIAL_TOKENS))
        if int(gene_ids.max()) >= vocab_size:
            raise ValueError(f"gene_ids reach {int(gene_ids.max())} but vocab_size is {vocab_size}.")
        means = np.ones(n_genes) if gene_means is None else np.asarray(gene_means, dtype=np.float64)
        if means.shape != (n_genes,):
            raise ValueError(f"gene_means must have one value per input gene ({n_genes}); got shape {means.shape}.")
        scale = np.where((gene_ids.numpy() >= 0) & (means > 0), 1.0 / np.where(means > 0, means, 1.0), 0.0)
        self.register_buffer("gene_ids", gene_ids)
        self.register_buffer("gene_scale", torch.as_tensor(scale, dtype=torch.float32))
        self.n_genes, self.vocab_size, self.n_tokens = n_genes, vocab_size, int(n_tokens)
        self.d_model, self.pooling, self.target_sum = d_model, pooling, float(target_sum)
        self.token_embedding = nn.Embedding(vocab_size, d_model, padding_idx=PAD_ID)
        self.position_embedding = nn.Embedding(self.n_tokens + 1, d_model)
        layer = nn.TransformerEncoderLayer(
            d_model, n_heads, dim_feedforward=4 * d_model, dropout=dropout, activation="gelu", batch_first=True,
            norm_first=True,
        )
        self.transformer = nn.TransformerEncoder(layer, n_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.n_output = d_model if n_output is None else int(n_output)
        self.head = (
            nn.Identity()
            if n_output is None
            else MLP(d_model, n_output, n_hidden=n_hidden, n_layers=n_head_layers, dropout=dropout)
        )

    def tokenize(self, counts: torch.Tensor) -> torch.Tensor:
        """(B, n_tokens) rank tokens of raw counts over the input genes."""
        return rank_tokens(counts, self.gene_ids, self.gene_scale, self.n_tokens, target_sum=self.target_sum)

    def encode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T, d_model) contextual token states (a ``<cls>`` state first when ``pooling='cls'``)."""
        if self.pooling == "cls":
            ids = torch.cat([ids.new_full((ids.shape[0], 1), CLS_ID), ids], dim=1)
        pad = ids == PAD_ID
        pos = torch.arange(ids.shape[1], device=ids.device)
        h = self.token_embedding(ids) + self.position_embedding(pos)[None]
        # a spot without any expressed gene would attend to nothing: let it attend to its first position
        pad = pad & ~(pad.all(1, keepdim=True) & (pos == 0)[None])
        h = self.transformer(h, src_key_padding_mask=pad)
        return self.norm(h)

    def pool(self, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """(B, d_model) spot features from the token states."""
        if self.pooling == "cls":
            return h[:, 0]
        real = (ids != PAD_ID).unsqueeze(-1).to(h.dtype)
        return (h * real).sum(1) / real.sum(1).clamp(min=1.0)

    def embed(self, counts: torch.Tensor) -> torch.Tensor:
        """(B, d_model) pooled features of raw counts (before the head)."""
        ids = self.tokenize(counts)
        return self.pool(self.encode_tokens(ids), ids)

    def forward(self, counts: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(counts))

    def body_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights of the tokens, positions and transformer (what pre-training learns; no head, no gene maps)."""
        skip = ("head.", "gene_ids", "gene_scale")
        return {k: v for k, v in self.state_dict().items() if not k.startswith(skip)}


def save_gene_encoder(
    path: str | os.PathLike,
    encoder: RankTransformerGeneEncoder,
    tokenizer: RankTokenizer,
    *,
    extra: dict[str, Any] | None = None,
) -> None:
    """Write a rank-transformer's weights together with its vocabulary and per-gene corpus means.

    Parameters
    ----------
    path
        File to write (a ``torch.save`` dictionary).
    encoder
        The encoder (its tokens, positions and transformer are saved; the head is not).
    tokenizer
        Vocabulary, corpus means and tokens per spot of the encoder.
    extra
        More entries to store (e.g. the MLM head, training history).

    Returns
    -------
    Nothing; writes ``path``.
    """
    config = {
        "n_tokens": encoder.n_tokens,
        "d_model": encoder.d_model,
        "n_layers": len(encoder.transformer.layers),
        "n_heads": encoder.transformer.layers[0].self_attn.num_heads,
        "dropout": float(encoder.transformer.layers[0].dropout.p),
        "pooling": encoder.pooling,
        "target_sum": encoder.target_sum,
    }
    payload = {
        "format": WEIGHTS_FORMAT,
        "config": config,
        "vocabulary": list(tokenizer.vocabulary.genes),
        "gene_means": np.asarray(tokenizer.gene_means, dtype=np.float64),
        "state_dict": {k: v.detach().cpu() for k, v in encoder.body_state_dict().items()},
        **(extra or {}),
    }
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save(payload, path)
    logger.info("Saved the gene encoder (%d genes) to %s", len(tokenizer.vocabulary.genes), path)


def read_gene_encoder_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check a file written by :func:`save_gene_encoder`.

    Parameters
    ----------
    path
        The weights file.

    Returns
    -------
    The stored dictionary (``config``, ``vocabulary``, ``gene_means``, ``state_dict``, ...).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"Gene encoder weights {path!r} not found. Pass the file written by "
            "`imagene.model.GeneEncoderPretrainer.save` (or `gene_encoder_weights=None` to train from scratch)."
        )
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or payload.get("format") != WEIGHTS_FORMAT:
        raise ValueError(
            f"{path!r} is not an imagene rank-transformer file (format {WEIGHTS_FORMAT!r}); write one with "
            "`imagene.model.GeneEncoderPretrainer.save`."
        )
    return payload


def load_gene_encoder(
    path: str | os.PathLike, genes: Sequence[str], n_output: int | None = None, **kwargs: Any
) -> RankTransformerGeneEncoder:
    """A pre-trained rank-transformer for a given gene panel (vocabulary and corpus means from the file).

    Input genes outside the pre-training vocabulary are never tokens (logged); if none is known,
    a ``ValueError`` names the problem.

    Parameters
    ----------
    path
        File written by :func:`save_gene_encoder` / ``GeneEncoderPretrainer.save``.
    genes
        Symbols of the counts' columns, in order.
    n_output
        Output width of a new (trainable) head; ``None`` for the pooled features.
    **kwargs
        Head settings (``n_hidden``, ``n_head_layers``) and ``dropout``.

    Returns
    -------
    The encoder with pre-trained tokens, positions and transformer.

    Examples
    --------
    >>> enc = load_gene_encoder("gene_encoder.pt", adata.var_names, n_output=None)
    """
    payload = read_gene_encoder_file(path)
    config = {**payload["config"]}
    if "dropout" in kwargs:
        config["dropout"] = kwargs.pop("dropout")
    vocab = GeneVocabulary(payload["vocabulary"])
    tok = RankTokenizer(vocab, payload["gene_means"], n_tokens=config["n_tokens"], target_sum=config["target_sum"])
    ids, _ = tok.input_maps(list(genes))
    means = np.ones(len(ids))
    means[ids >= 0] = tok.gene_means[ids[ids >= 0] - len(SPECIAL_TOKENS)]
    enc = RankTransformerGeneEncoder(
        len(ids), n_output, vocab_size=len(vocab), gene_ids=ids, gene_means=means, **config, **kwargs
    )
    missing, unexpected = enc.load_state_dict(payload["state_dict"], strict=False)
    missing = [k for k in missing if not k.startswith(("head.", "gene_ids", "gene_scale"))]
    if missing or unexpected:
        raise ValueError(f"{path!r} does not match the encoder (missing {missing[:3]}, unexpected {unexpected[:3]}).")
    n_known = int((ids >= 0).sum())
    logger.info("Loaded a pre-trained gene encoder: %d of %d input genes are in its vocabulary", n_known, len(ids))
    return enc


# ------------------------------------------------------------------------------------------
# gene encoder registry
# ------------------------------------------------------------------------------------------
_GENE_ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_gene_encoder(name: str, factory: Callable[..., nn.Module]) -> None:
    """Register a gene encoder factory ``factory(n_input, n_output, **kwargs) -> nn.Module``.

    The module maps raw counts (B, n_input) to (B, n_output) and has an ``n_output`` attribute.

    Parameters
    ----------
    name
        Registry name.
    factory
        Callable building the module.

    Returns
    -------
    Nothing.

    Examples
    --------
    >>> register_gene_encoder("linear", lambda n_input, n_output, **kw: GeneMLPEncoder(n_input, n_output, n_layers=0))
    """
    _GENE_ENCODERS[str(name)] = factory


def list_gene_encoders() -> list[str]:
    """Names accepted by :func:`get_gene_encoder`.

    Returns
    -------
    Sorted registry names.

    Examples
    --------
    >>> list_gene_encoders()
    ['mlp', 'rank_transformer']
    """
    return sorted(_GENE_ENCODERS)


def get_gene_encoder(name: str, n_input: int, n_output: int | None = None, **kwargs: Any) -> nn.Module:
    """Build a gene encoder by name: raw counts (B, n_input) → (B, n_output).

    ``'mlp'``: :class:`GeneMLPEncoder` on log-normalised counts (kwargs ``n_hidden``, ``n_layers``,
    ``dropout``). ``'rank_transformer'``: :class:`RankTransformerGeneEncoder` on rank tokens
    (kwargs ``genes`` and ``weights`` to load pre-trained weights for a gene panel, or its own
    arguments such as ``gene_means``, ``n_tokens``, ``d_model``, ``n_layers``, ``n_heads``).

    Parameters
    ----------
    name
        Registry name (:func:`list_gene_encoders`).
    n_input
        Number of input genes.
    n_output
        Output width (``None``: the encoder's own feature width, for encoders that have one).
    **kwargs
        Encoder settings.

    Returns
    -------
    The module; its ``n_output`` attribute gives the output width.

    Examples
    --------
    >>> enc = get_gene_encoder("rank_transformer", 2000, 64, n_tokens=128)
    >>> enc(torch.poisson(torch.rand(4, 2000))).shape
    torch.Size([4, 64])
    """
    if name not in _GENE_ENCODERS:
        raise ValueError(f"Unknown gene encoder {name!r}; choose one of {list_gene_encoders()}.")
    return _GENE_ENCODERS[name](n_input, n_output, **kwargs)


def _mlp_factory(n_input: int, n_output: int | None = None, **kwargs: Any) -> nn.Module:
    if n_output is None:
        raise ValueError("The 'mlp' gene encoder needs n_output.")
    for key in ("weights", "genes", "gene_means"):
        if kwargs.pop(key, None) is not None:
            raise ValueError(f"The 'mlp' gene encoder takes no {key!r}; pre-trained weights are for 'rank_transformer'.")
    enc = GeneMLPEncoder(n_input, n_output, **kwargs)
    enc.n_output = n_output
    return enc


def _rank_transformer_factory(n_input: int, n_output: int | None = None, **kwargs: Any) -> nn.Module:
    weights = kwargs.pop("weights", None)
    genes = kwargs.pop("genes", None)
    if weights is not None:
        if genes is None:
            raise ValueError("Loading rank-transformer weights needs `genes=` (the symbols of the input columns).")
        if len(genes) != n_input:
            raise ValueError(f"genes has {len(genes)} symbols for n_input={n_input}.")
        head = {k: kwargs.pop(k) for k in ("n_hidden", "n_head_layers", "dropout") if k in kwargs}
        if kwargs:
            logger.info("Architecture settings %s are taken from the weights file, not from arguments", sorted(kwargs))
        return load_gene_encoder(weights, genes, n_output, **head)
    return RankTransformerGeneEncoder(n_input, n_output, **kwargs)


register_gene_encoder("mlp", _mlp_factory)
register_gene_encoder("rank_transformer", _rank_transformer_factory)
