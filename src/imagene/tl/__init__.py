"""Tools that write model outputs into AnnData (obsm / layers)."""

from imagene.tl._model_outputs import embed, predict_expression

__all__ = ["embed", "predict_expression"]
