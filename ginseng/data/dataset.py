"""GinsengDataset: open a store, read its metadata and counts, splits, batches.

The store format is in ``ginseng.data.format``, creation in ``ginseng.data.create``, the holdout
rules in ``ginseng.data.splits``, epoch plans in ``ginseng.data.sampler`` and their execution in
``ginseng.data.loader``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tensorstore as ts
import zarr

from ginseng.data import create as _create
from ginseng.data import splits as _splits
from ginseng.data.format import (
    ALL_CHUNKS_ATTR,
    FORMAT_NAME,
    FORMAT_VERSION,
    SPLITS,
    Flag,
    as_seed,
    check_batch_size,
    read_attrs,
    read_label_values,
    read_str_array,
)
from ginseng.data.loader import BatchLoader

__all__ = ["GinsengDataset"]


class GinsengDataset:
    """A zarr-based dataset for efficient cell-level access.

    Parameters
    ----------
    path : str | Path
        An existing ginseng dataset (made by :meth:`create`). Opened read-only.

    Attributes
    ----------
    path : Path
        Path to the ginseng dataset zarr store.
    store : zarr.storage.LocalStore
        The read-only local zarr store.
    root : zarr.Group
        Zarr group holding the dataset.
    """

    def __init__(self, path):
        self.path = Path(path)
        attrs = read_attrs(self.path)
        if attrs is None:
            msg = f"{str(self.path)!r} is not a ginseng dataset (no zarr group with format {FORMAT_NAME!r})"
            raise ValueError(msg)
        version = attrs.get("format_version")
        if version != FORMAT_VERSION:
            msg = (
                f"{str(self.path)!r} is a ginseng dataset of format_version {version!r}; this ginseng "
                f"reads version {FORMAT_VERSION}. Re-create the dataset with this version of ginseng."
            )
            raise ValueError(msg)
        if attrs.get("complete") is not True:
            msg = f"{str(self.path)!r} is an incomplete ginseng dataset (its creation did not finish); re-create it"
            raise ValueError(msg)
        self._open()

    # ------------------------------------------------------------------ opening
    def _damaged(self, what: str, err: BaseException) -> ValueError:
        """The error for a store whose files are missing or corrupted, naming the store."""
        msg = (
            f"ginseng dataset {str(self.path)!r} is damaged: {what} failed ({type(err).__name__}: "
            f"{err}). A chunk or metadata file is missing or corrupted; re-create the dataset."
        )
        return ValueError(msg)

    def _open(self) -> None:
        """Open the arrays and read the metadata; any failure names the store."""
        try:
            self._reopen_readonly()
            self._load_metadata()
        except ValueError as err:
            if str(self.path) in str(err) and "damaged" in str(err):
                raise
            raise self._damaged("reading its metadata", err) from err
        except Exception as err:  # zarr, numcodecs and TensorStore raise many kinds
            raise self._damaged("reading its metadata", err) from err

    def _reopen_readonly(self) -> None:
        """Helper to reopen store in read-only mode."""
        self.store = zarr.storage.LocalStore(self.path, read_only=True)
        self.root = zarr.open_group(self.store, mode="r")
        # TensorStore reads the counts: asynchronous, many chunks decoded concurrently.
        spec = {
            "driver": "zarr3",
            "kvstore": {"driver": "file", "path": str(self.path.resolve() / "X")},
        }
        if self.root.attrs.get(ALL_CHUNKS_ATTR) is True:
            # Every chunk was written: a missing one is an error, not a block of zeros.
            spec["fill_missing_data_reads"] = False
        self._X = ts.open(spec, read=True, open=True).result()

    def _check_arrays(self, names: list[str]) -> None:
        """Refuse a store whose arrays disagree with its attributes or lack chunk files."""
        root = self.root
        problems = []
        if tuple(self._X.shape) != (self.n_cells, self.n_genes):
            problems.append(
                f"X has shape {tuple(self._X.shape)}, expected ({self.n_cells}, {self.n_genes})"
            )
        if self.attrs.get(ALL_CHUNKS_ATTR) is True:
            for name in names:
                arr = root[name]
                if arr.nchunks_initialized != arr.nchunks:
                    problems.append(
                        f"array {name!r} has {arr.nchunks_initialized} of its {arr.nchunks} chunk files"
                    )
        if problems:
            msg = (
                f"ginseng dataset {str(self.path)!r} is damaged: "
                + "; ".join(problems)
                + ". Re-create the dataset."
            )
            raise ValueError(msg)

    def _load_metadata(self) -> None:
        """Load metadata from zarr store."""
        root = self.root
        attrs = dict(root.attrs)
        self.attrs = attrs
        self.n_cells = int(attrs["n_cells"])
        self.n_genes = int(attrs["n_genes"])
        arrays = ["order", "labels", "label_values", "genes"]
        if "group_codes" in root:
            arrays += ["group_codes", "group_values"]
        if attrs.get("split"):
            arrays += [f"{attrs['split']}/train", f"{attrs['split']}/holdout"]
        self._check_arrays(arrays)
        self.chunk_rows = int(attrs["chunk_rows"])
        self.uuid = str(attrs["uuid"])
        self.identity = f"{self.uuid}:{self.n_cells}x{self.n_genes}"
        self.genes = read_str_array(root["genes"])
        self.label_values = read_label_values(root["label_values"])
        self.n_labels = len(self.label_values)
        self.label_keys = np.arange(self.n_labels)
        self.labels = np.asarray(root["labels"][:], dtype=np.int32)
        self._order = np.asarray(root["order"][:], dtype=np.int64)
        self._rank = np.empty_like(self._order)
        self._rank[self._order] = np.arange(self.n_cells, dtype=np.int64)
        if "group_codes" in root:
            values = read_str_array(root["group_values"])
            self.groups = values[np.asarray(root["group_codes"][:])]
        else:
            self.groups = None
        lengths = {
            "labels": (len(self.labels), self.n_cells),
            "order": (len(self._order), self.n_cells),
            "genes": (len(self.genes), self.n_genes),
        }
        wrong = [f"{k} has {n} entries, expected {e}" for k, (n, e) in lengths.items() if n != e]
        if self.labels.size and not 0 <= self.labels.min() <= self.labels.max() < self.n_labels:
            wrong.append(f"labels hold codes outside [0, {self.n_labels})")
        if wrong:
            msg = f"ginseng dataset {str(self.path)!r} is damaged: " + "; ".join(wrong)
            raise ValueError(msg)
        self.label_indices = {
            k: np.flatnonzero(self.labels == k).astype(np.int64) for k in range(self.n_labels)
        }
        split = attrs.get("split")
        if split:
            self.train_indices = np.asarray(root[f"{split}/train"][:], dtype=np.int64)
            self.holdout_indices = np.asarray(root[f"{split}/holdout"][:], dtype=np.int64)
        else:
            self.train_indices = np.arange(self.n_cells, dtype=np.int64)
            self.holdout_indices = np.zeros(0, dtype=np.int64)

    def __repr__(self) -> str:
        return (
            f"GinsengDataset({str(self.path)!r}, n_cells={self.n_cells}, n_genes={self.n_genes}, "
            f"n_labels={self.n_labels}, train={len(self.train_indices)}, holdout={len(self.holdout_indices)})"
        )

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        path,
        adata,
        labels,
        chunk_size=None,
        groups=None,
        gene_key=None,
        gene_mask=None,
        layer=None,
        *,
        genes=None,
        cells=None,
        shuffle=True,
        seed=0,
        overwrite=False,
        silent=False,
    ) -> GinsengDataset:
        """Autodetect array type and create a dataset.

        Parameters
        ----------
        path : str | Path
            Path to store the new dataset (a directory). Built in a temporary directory beside it
            and renamed into place when complete.
        adata : AnnData | np.ndarray | scipy.sparse matrix
            Counts (cells x genes). AnnData may be in memory or backed; it is read in row blocks.
        labels : np.ndarray | str
            One label per cell, or a column of ``adata.obs``.
        chunk_size : int | tuple[int, int], optional
            Rows per chunk, or (rows, genes). Default: ~1 MB of counts per chunk, all genes.
        groups : np.ndarray | str, optional
            One group per cell (e.g. donor), or a column of ``adata.obs``; used by group-level holdout.
        gene_key : str, optional
            Column of ``adata.var`` with gene names (default: ``adata.var_names``).
        gene_mask : np.ndarray | str, optional
            Boolean mask of genes to keep, or the name of a boolean column of ``adata.var``.
        layer : str, optional
            Read counts from ``adata.layers[layer]`` instead of ``adata.X``.
        genes : array-like, optional
            Gene names (for array input, or to override); length n_genes before or after the mask.
        cells : array-like of int or bool, optional
            Keep only these input rows (row indices or a boolean mask), e.g. the training cells
            of a backed file, read block by block without loading the rest. ``labels`` and
            ``groups`` still give one value per input row. The rows are taken in input order
            (indices are sorted): dataset index i is the i-th kept row.
        shuffle : bool
            Store rows in a seeded random permutation (fast shuffled epochs). Indices stay original.
        seed : int
            Seed of that permutation.
        overwrite : bool
            Replace an existing ginseng dataset at ``path``. A path that is not a ginseng dataset
            is never replaced.
        silent : bool
            No progress bars.

        Returns
        -------
        GinsengDataset
            Instance of the created dataset.
        """
        return _create.create_dataset(
            cls, path, adata, labels, chunk_size, groups, gene_key, gene_mask, layer, genes=genes,
            cells=cells, shuffle=shuffle, seed=seed, overwrite=overwrite, silent=silent,
        )

    # The permuted write (a staticmethod, so that a test can make it fail half-way).
    _write_permuted = staticmethod(_create.write_permuted)

    @classmethod
    def _create_from_numpy(
        cls, path, X, labels, chunk_size=None, groups=None, genes=None, column_mask=None, **kwargs
    ):
        """Create cached dataset from a dense numpy array (see :meth:`create`)."""
        return cls.create(
            path,
            np.asarray(X),
            labels,
            chunk_size,
            groups,
            gene_mask=column_mask,
            genes=genes,
            **kwargs,
        )

    @classmethod
    def _create_from_sparse(
        cls,
        path,
        adata,
        labels,
        chunk_size=None,
        groups=None,
        genes=None,
        column_mask=None,
        **kwargs,
    ):
        """Create cached dataset from a sparse count matrix or an AnnData holding one (see :meth:`create`)."""
        return cls.create(
            path, adata, labels, chunk_size, groups, gene_mask=column_mask, genes=genes, **kwargs
        )

    # ------------------------------------------------------------------ splits
    @property
    def has_holdout(self) -> Flag:
        """Whether the dataset has a train/holdout split.

        A property, as in ginseng 0.1 (``if ds.has_holdout:``); the value can also be called,
        ``ds.has_holdout()``, as the seed API lists it among the methods.
        """
        return Flag(bool(self.attrs.get("split")))

    @property
    def n_groups(self) -> int:
        """Number of distinct groups (0 when the dataset was created without groups)."""
        return 0 if self.groups is None else len(np.unique(self.groups))

    def _split_indices(self, split: str) -> np.ndarray:
        if split == "train":
            return self.train_indices
        if split == "holdout":
            return self.holdout_indices
        if split == "all":
            return np.arange(self.n_cells, dtype=np.int64)
        msg = f"split must be one of {SPLITS}, found {split!r}"
        raise ValueError(msg)

    def make_holdout(
        self, holdout_fraction=0.2, rng=None, group_level=False, group_mode="fraction"
    ) -> None:
        """Create and persist a train/holdout split.

        Parameters
        ----------
        holdout_fraction : float
            In (0, 1). Per label, int(smallest label count * holdout_fraction) cells are held out
            (the same number for every label). With ``group_level``, the fraction of groups held out.
        rng : np.random.Generator | int, optional
            Randomness (None means seed 0): the same seed gives the same split, always.
        group_level : bool
            Hold out whole groups, so that no group has cells in both train and holdout.
        group_mode : str
            'fraction': round(n_groups * holdout_fraction) groups (at least 1, fewer than all);
            'loo': one group.
        """
        train, holdout, params = _splits.holdout_split(self, holdout_fraction, rng, group_level, group_mode)
        self._persist_split(train, holdout, params)

    def _persist_split(self, train: np.ndarray, holdout: np.ndarray, params: dict) -> None:
        _splits.persist_split(self.path, train, holdout, params)
        self._open()


    # ------------------------------------------------------------------ reading
    def _read_stored(self, rows: np.ndarray) -> np.ndarray:
        """Stored rows (sorted unique int64) in their stored dtype, read concurrently."""
        if rows.size == 0:
            return np.zeros((0, self.n_genes), dtype=self._X.dtype.numpy_dtype)
        try:
            return self._X.oindex[rows].read().result()
        except ValueError as err:  # TensorStore: a missing or undecodable chunk
            raise self._damaged("reading counts", err) from err

    def get_batch(self, indices) -> np.ndarray:
        """Retrieve a batch of count data for given cell indices.

        Parameters
        ----------
        indices : np.ndarray
            ORIGINAL cell indices, any order, repeats allowed.

        Returns
        -------
        np.ndarray
            float32 (len(indices), n_genes).
        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < -self.n_cells or idx.max() >= self.n_cells):
            msg = f"cell indices must be in [0, {self.n_cells}), found min {idx.min()} max {idx.max()}"
            raise IndexError(msg)
        idx = np.where(idx < 0, idx + self.n_cells, idx)
        stored = self._rank[idx]
        uniq, inv = np.unique(stored, return_inverse=True)
        data = self._read_stored(uniq)
        return data[inv.reshape(-1)].astype(np.float32)

    # Rows of float32 per window of an ordered pass over a randomly stored dataset.
    ORDERED_WINDOW_BYTES = 256 * 2**20

    def _iter_in_order(self, batch_size, split):
        batch_size = check_batch_size(batch_size)
        cells = np.sort(np.asarray(self._split_indices(split), dtype=np.int64))
        per_window = max(1, self.ORDERED_WINDOW_BYTES // (4 * max(1, self.n_genes)) // batch_size)
        window = per_window * batch_size
        labels = np.asarray(self.labels)
        for w0 in range(0, len(cells), window):
            idx = cells[w0 : w0 + window]
            x = self.get_batch(idx)
            y = labels[idx].astype(np.int32)
            for b0 in range(0, len(idx), batch_size):
                yield x[b0 : b0 + batch_size], y[b0 : b0 + batch_size]

    def __len__(self, split: str = "all") -> int:
        """Return the number of samples in ``split`` ("all", "train", or "holdout")."""
        return len(self._split_indices(split))

    def __getitem__(self, idx, split: str = "all"):
        """(expression float32 [n_genes], label int) of position ``idx`` within ``split``."""
        if isinstance(idx, tuple):
            idx, split = idx
        ind = self._split_indices(split)
        i = int(ind[idx])
        return self.get_batch([i])[0], int(self.labels[i])

    def loader(
        self,
        batch_size,
        *,
        split="train",
        shuffle=True,
        balance=False,
        seed=0,
        pad_multiple=1,
        process_index=0,
        process_count=1,
        prefetch=2,
        dtype=np.float32,
        workers=None,
    ) -> BatchLoader:
        """A :class:`BatchLoader` over ``split`` (see its docstring)."""
        return BatchLoader(
            self,
            batch_size,
            split=split,
            shuffle=shuffle,
            balance=balance,
            seed=seed,
            pad_multiple=pad_multiple,
            process_index=process_index,
            process_count=process_count,
            prefetch=prefetch,
            dtype=dtype,
            workers=workers,
        )

    def iter_batches(self, batch_size, shuffle=False, rng=None, split="all", balance_train=False):
        """Iterate through the dataset in batches.

        Parameters
        ----------
        batch_size : int
            Number of samples per batch (the last batch may be smaller).
        shuffle : bool
            Random order (chunk-window buffer shuffle over a randomly stored dataset). Otherwise
            the cells of ``split`` in dataset (original) order, as in the input the dataset was
            created from. On a store written in random order (``create(shuffle=True)``, the
            default) that order is read in windows of at most ~256 MB of rows, each of which
            touches every chunk: a full ordered pass decodes the store about once per window,
            so prefer ``shuffle=True`` (or :meth:`loader`) where order does not matter.
        rng : np.random.Generator | int, optional
            Randomness used if shuffling (and for balancing).
        split : str
            "all", "train", or "holdout".
        balance_train : bool
            Every label contributes the same number of cells (rare labels oversampled).

        Yields
        ------
        tuple[np.ndarray, np.ndarray]
            x float32 (rows, n_genes), y int32 (rows,).
        """
        if not shuffle and not balance_train:
            yield from self._iter_in_order(batch_size, split)
            return
        ld = self.loader(
            batch_size, split=split, shuffle=shuffle, balance=balance_train, seed=as_seed(rng)
        )
        for b in ld.epoch(0):
            if b.mask.all():
                yield b.x, b.y
            else:
                yield b.x[b.mask], b.y[b.mask]
