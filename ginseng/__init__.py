"""ginseng: cell-type classifiers for single-cell RNA-seq, trained data-parallel with JAX.

Modules
-------
annotate  annotate new data with a trained model (streamed, sharded)
augment   count-level augmentations (pure JAX)
data      GinsengDataset: a zarr v3 store read through TensorStore, and its batch loader
io        readers for h5ad / 10x h5 / 10x mtx, and model files in HDF5
nn        the annotation network (pure JAX)
opt       Adam (pure JAX)
train     settings, logger, model state and the data-parallel trainer
utils     highly variable gene selection
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("ginseng")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"

_SUBMODULES = ("annotate", "augment", "data", "io", "nn", "opt", "train", "utils")
__all__ = ["__version__", "annotate", "augment", "data", "io", "nn", "opt", "train", "utils"]


def __getattr__(name):
    # Submodules are imported on first use, so `import ginseng` stays cheap and importing one
    # module (say, ginseng.nn) does not pull in anndata, zarr or tensorstore.
    if name in _SUBMODULES:
        import importlib

        return importlib.import_module(f"ginseng.{name}")
    msg = f"module 'ginseng' has no attribute {name!r}"
    raise AttributeError(msg)
