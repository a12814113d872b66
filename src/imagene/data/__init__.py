"""Data: batching of the inputs that :mod:`imagene.pp` writes into AnnData, for the models' training and inference.

The objects here read documented AnnData keys (never compute them: that is :mod:`imagene.pp`) and
turn them into the tensors a :mod:`imagene.module` consumes. Today: the tile graphs of
:func:`imagene.pp.tile_graphs` with the multi-crop features of :func:`imagene.pp.embed_tile_crops`,
batched as whole tiles for :class:`imagene.model.SIGMMA`.
"""

from imagene.data._tiles import TileBatchSampler, TileDataset, TileGraphData, TileGraphDataModule, tile_datamodule

__all__ = ["TileBatchSampler", "TileDataset", "TileGraphData", "TileGraphDataModule", "tile_datamodule"]
