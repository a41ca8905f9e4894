"""Annotate cells with a trained ginseng model: streamed, sharded, written as it goes.

The input (in-memory or backed AnnData, a path to .h5ad / 10x .h5 / 10x mtx folder, or a
:class:`ginseng.data.GinsengDataset`) is read in contiguous row blocks. Its genes are mapped onto
the model's genes once, as an index array (missing genes become zero columns). Every batch has one
fixed shape (the last one is padded and its padding dropped on the host), so the forward pass is
compiled once; it runs jitted over a ``"data"`` mesh of all devices with replicated parameters.
Under ``jax.distributed`` every process reads its own contiguous rows of each global batch and the
results are gathered once per batch. A background thread reads the next block while the devices
compute the current one.

With ``output=`` results go to a table file (parquet or CSV) and, when asked, probabilities and
gene weights go to a zarr store beside it, block by block: memory does not grow with the number of
cells beyond the input's own ``obs``.

The rooms: ``genes`` (gene mapping), ``sources`` (one class per input kind), ``forward`` (the
jitted forward pass and the batch stream over the mesh), ``sinks`` (memory, table file,
probs/attn store, truth report), ``run`` (:func:`annotate` as stages).
"""

from ginseng.annotate.run import annotate, annotate_iter_full, annotate_iter_partial

__all__ = ["annotate", "annotate_iter_full", "annotate_iter_partial"]
