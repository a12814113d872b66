"""Loading a saved imagene model with or without its training AnnData."""

from __future__ import annotations

import logging
import os
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata import AnnData

from imagene._utils import check_adata

logger = logging.getLogger("imagene")


def _has_counts(adata: AnnData, layer: str | None) -> bool:
    mat = adata.X if layer is None else adata.layers.get(layer) if layer in adata.layers else None
    if mat is None:
        return False
    return bool(mat.nnz > 0) if sp.issparse(mat) else bool(np.any(np.asarray(mat)))


def _torch_device(accelerator: str, device: int | str) -> torch.device:
    if accelerator == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device(f"cuda:{device}" if isinstance(device, int) else "cuda")


def load_model(
    cls: type,
    dir_path: str | os.PathLike,
    adata: AnnData | None,
    *,
    accelerator: str = "auto",
    device: int | str = "auto",
    prefix: str | None = None,
    **kwargs: Any,
) -> Any:
    """Load a saved imagene model; ``adata`` is registered only when it matches the model (see ``Model.load``)."""
    from scvi.model.base import BaseModelClass

    path = os.path.join(str(dir_path), f"{prefix or ''}model.pt")
    if not os.path.exists(path):
        raise FileNotFoundError(f"No saved model at {path!r}. Save one with `model.save(dir_path)`.")
    saved = torch.load(path, map_location="cpu", weights_only=False)
    var_names = pd.Index(np.asarray(saved.get("var_names", [])).astype(str))
    attr = dict(saved["attr_dict"])
    registry = attr["registry_"]
    layer = registry.get("setup_args", {}).get("layer")
    if adata is not None:
        check_adata(adata)
        if adata.var_names.equals(var_names) and _has_counts(adata, layer):
            return BaseModelClass.load.__func__(
                cls, str(dir_path), adata=adata, accelerator=accelerator, device=device, prefix=prefix, **kwargs
            )
        reason = (
            f"its genes differ from the model's {len(var_names)}" if not adata.var_names.equals(var_names)
            else f"it has no counts in {'X' if layer is None else f'layers[{layer!r}]'}"
        )
        logger.info(
            "Loading %s without training data: the AnnData passed is not registered (%s). Pass it as the query of "
            "predict_expression / get_latent_representation; predictions cover the model's %d genes.",
            cls.__name__, reason, len(var_names),
        )
    if "module_args_" not in attr:
        raise ValueError(
            f"The model in {str(dir_path)!r} was saved by an older imagene that did not store its module settings; "
            "load it with its training AnnData (`load(dir_path, adata=training_adata)`) and save it again."
        )
    attr.pop("registry_")
    init_params = attr.pop("init_params_")
    model = cls.__new__(cls)
    BaseModelClass.__init__(model, None, registry=registry)
    margs = attr["module_args_"]
    model.module = cls._module_cls(*margs["args"], **margs["kwargs"])
    flat = dict(init_params.get("non_kwargs", {}))
    for group in init_params.get("kwargs", {}).values():
        flat.update(group)
    model._model_summary_string = f"{cls.__name__} (loaded from {str(dir_path)!r} without training data)"
    if hasattr(model, "_init_without_data"):
        model._init_without_data(flat)
    for name, value in attr.items():
        setattr(model, name, value)
    model.init_params_ = init_params
    state = dict(saved["model_state_dict"])
    state.pop("pyro_param_store", None)  # scvi-tools stores it for every model; no imagene module uses Pyro
    model.module.load_state_dict(state)
    model.module.to(_torch_device(accelerator, device))
    model.module.eval()
    return model
