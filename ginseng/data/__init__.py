"""GinsengDataset: cell counts in a zarr v3 store, read through TensorStore, and its batch loader.

The rooms (each file one concern):

- ``format``: the store spec (attributes, codec, chunking, string and label arrays).
- ``create``: ``GinsengDataset.create`` as stages (counts -> obs -> genes -> layout -> write).
- ``dataset``: :class:`GinsengDataset`: open, damage checks, reads, ``iter_batches``, ``loader``.
- ``splits``: the holdout rules and persisting the live split.
- ``sampler``: the epoch plan (balance, buffer shuffle, per-process slots); pure numpy.
- ``loader``: :class:`BatchLoader`, which executes a plan (reads in flight, assembly, prefetch).
"""

from ginseng.data.dataset import GinsengDataset
from ginseng.data.format import FORMAT_NAME, FORMAT_VERSION, Batch
from ginseng.data.loader import BatchLoader

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "Batch", "BatchLoader", "GinsengDataset"]
