"""Tools that write model outputs into AnnData (obsm / layers)."""

from imagene.tl._model_outputs import embed, predict_expression
from imagene.tl._probe import linear_probe
from imagene.tl._retrieve import retrieve

__all__ = ["embed", "linear_probe", "predict_expression", "retrieve"]
