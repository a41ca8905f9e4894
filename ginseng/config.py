"""Structured configuration of the ``ginseng`` command line (Hydra).

Each section of the configuration is a dataclass whose fields carry their own documentation and
whose ``__post_init__`` checks the values. The dataclasses are registered in Hydra's
``ConfigStore`` (as ``ginseng_schema``); the YAML files in ``configs/`` only choose among them and
override values. Hydra merges overrides into the schema, so a wrong type is refused at start;
:func:`to_object` turns the merged ``DictConfig`` into these dataclasses, which runs the range
checks of ``__post_init__``.

Everything here is plain Python: ``tasks.run(cfg, workdir)`` accepts either a ``DictConfig`` from
Hydra or a :class:`GinsengConfig` built by hand.
"""

from __future__ import annotations

import difflib
import enum
import os
from dataclasses import MISSING, dataclass, field, fields, is_dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

__all__ = [
    "AnnotateConfig",
    "ConfigKeyError",
    "DataConfig",
    "DistributedConfig",
    "GenesConfig",
    "GinsengConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainerConfig",
    "compose",
    "config_dir",
    "register_configs",
    "to_object",
    "to_trainer_settings",
    "validate_overrides",
]


class Task(str, enum.Enum):
    """What one run of ``python -m ginseng.launch`` does."""

    prepare = "prepare"
    train = "train"
    annotate = "annotate"


class GeneSelection(str, enum.Enum):
    """How the genes the model sees are chosen."""

    hvg = "hvg"
    all = "all"


class DistributedMode(str, enum.Enum):
    """How this process finds the other processes of a run."""

    none = "none"
    local = "local"
    slurm = "slurm"
    auto = "auto"


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _check_fraction(name: str, value: float, low_open: bool, high_open: bool = True) -> None:
    low_ok = value > 0 if low_open else value >= 0
    high_ok = value < 1 if high_open else value <= 1
    if not (low_ok and high_ok):
        lo = "(0" if low_open else "[0"
        hi = "1)" if high_open else "1]"
        _fail(f"{name} must be in {lo}, {hi}, got {value}")


def _check_min(name: str, value: float | None, minimum: float) -> None:
    if value is not None and value < minimum:
        _fail(f"{name} must be >= {minimum}, got {value}")


def _check_training_values(section, prefix: str) -> None:
    """Run the trainer's own checks (``ginseng.train.settings``, the one place training values are
    checked) on the fields of a config section that are training settings, naming the CLI keys."""
    from ginseng.train.settings import RULES, check_values

    values = {f.name: getattr(section, f.name) for f in fields(section) if f.name in RULES}
    check_values(values, name=f"{prefix}.{{}}".format)


@dataclass
class DataConfig:
    """Which cells and labels to train on, and where the built dataset goes."""

    path: str | None = None
    """Input counts: .h5ad, 10x .h5 or a 10x mtx folder. None: the embedded pbmc3k data
    (``ginseng.datasets.pbmc3k_path()``). Relative paths are relative to the working directory."""

    labels: str = "cell_type"
    """Column of ``obs`` with the cell-type label of every cell."""

    groups: str | None = None
    """Column of ``obs`` with a group per cell (donor, batch) for group-level holdouts."""

    labels_file: str | None = None
    """A CSV of ``barcode,label`` giving every cell its label, for inputs without obs columns
    (10x .h5 / mtx). It becomes the obs column named by ``data.labels``; every barcode must match
    a cell of the input and every cell must have a label."""

    groups_file: str | None = None
    """A CSV of ``barcode,group``, as ``data.labels_file``, for the column named by ``data.groups``."""

    gene_key: str | None = None
    """Column of ``var`` with the gene names to use; None: ``var_names``."""

    layer: str | None = None
    """Read counts from ``adata.layers[layer]`` instead of ``X`` (raw counts often live there)."""

    backed: bool = False
    """Open an .h5ad in backed (on-disk) mode: gene selection, the dataset store and the test
    annotation read the training and test rows block by block from the file, so memory does not
    grow with the number of cells (obs is still read whole, as anndata's backed mode does)."""

    min_cells: int | None = None
    """Labels with fewer cells than this in the input are left out (named in a warning and in the
    end summary). null (default): the fewest cells that still leave one holdout cell after the
    test split (6 at the default fractions; benchmarks/RESULTS.md 10). 0 keeps every label (then
    the smallest label must still leave one holdout cell; the error says how)."""

    test_fraction: float = 0.2
    """Fraction of the cells of every label set aside (stratified) before the dataset is built,
    never trained on, and used only for the final macro-F1. 0 disables the test set."""

    store: str = "dataset.zarr"
    """Where the GinsengDataset is written; relative paths are inside the run directory."""

    chunk_size: int | None = None
    """Rows per chunk of the dataset store; None: the dataset's default."""

    seed: int = 0
    """Seed of the stratified test split and of the dataset's row shuffle."""

    def __post_init__(self) -> None:
        _check_fraction("data.test_fraction", self.test_fraction, low_open=False)
        _check_min("data.chunk_size", self.chunk_size, 1)
        _check_min("data.min_cells", self.min_cells, 0)
        if not self.labels:
            _fail("data.labels must name an obs column, got an empty string")
        if not self.store:
            _fail("data.store must be a path, got an empty string")


@dataclass
class GenesConfig:
    """Which genes the model sees."""

    select: GeneSelection = GeneSelection.hvg
    """``hvg``: the most variable genes of the training cells (``compute_hvgs``); ``all``: every
    gene of the input."""

    n_top_genes: int = 2000
    """Number of highly variable genes when ``select=hvg``."""

    min_mean: float = 0.0125
    """Lower bound on a gene's mean expression for HVG selection."""

    max_mean: float = float("inf")
    """Upper bound on a gene's mean expression for HVG selection (default: none; see
    ginseng.utils.compute_hvgs)."""

    n_bins: int = 20
    """Number of mean-expression bins for HVG selection."""

    def __post_init__(self) -> None:
        _check_min("genes.n_top_genes", self.n_top_genes, 1)
        _check_min("genes.n_bins", self.n_bins, 1)
        if self.max_mean <= self.min_mean:
            _fail(f"genes.max_mean must be > genes.min_mean, got max_mean={self.max_mean}, "
                  f"min_mean={self.min_mean}")


@dataclass
class ModelConfig:
    """Shape of the classifier and its input normalization."""

    hidden_dim: int = 256
    """Width of the hidden layers."""

    dropout_rate: float = 0.1
    """Dropout probability during training (0.1: see GinsengTrainerSettings.dropout_rate)."""

    normalize: bool = True
    """Normalize every cell to ``target_sum`` counts and log1p before the network."""

    target_sum: float | None = None
    """Counts per cell after normalization; None: the number of genes."""

    def __post_init__(self) -> None:
        _check_training_values(self, "model")


@dataclass
class OptimConfig:
    """Adam with decoupled weight decay."""

    lr: float = 1e-3
    """Learning rate (the peak rate under a schedule)."""

    lr_schedule: str = "constant"
    """'constant': lr throughout; 'cosine': decay from lr to 0 over the run's steps."""

    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    """Decay rates of Adam's first and second moment estimates."""

    eps: float = 1e-8
    """Numerical stability constant of Adam."""

    weight_decay: float = 0.01
    """Decoupled weight decay."""

    def __post_init__(self) -> None:
        _check_training_values(self, "optim")


@dataclass
class TrainerConfig:
    """The training loop: epochs, batches, holdout, augmentation, checkpoints."""

    epochs: int = 10
    """Number of passes over the training cells. Default 10, as ``GinsengTrainer``'s: over 10
    splits at the current defaults, 5 epochs gave pbmc3k 0.909 but baron mouse1 -> mouse2 0.957,
    under its 0.97 target; 10 epochs give 0.906 and 0.977 (benchmarks/RESULTS.md, 6f)."""

    batch_size: int = 128
    """Global batch size (summed over every device of every process)."""

    balance_train: bool = False
    """Give every label the same number of cells per epoch by oversampling rare labels."""

    holdout_fraction: float = 0.2
    """Fraction (of the smallest label's count, per label) held out for per-epoch evaluation."""

    group_level: bool = False
    """Hold out whole groups (``data.groups``) instead of cells."""

    group_mode: str = "fraction"
    """Group holdout strategy: ``fraction`` or ``loo`` (leave one group out)."""

    rate: float | None = None
    """Augmentation: probability of masking each input count; None disables."""

    lam_max: float | None = None
    """Augmentation: largest Poisson mean of added background counts; None disables."""

    lower: int | None = None
    """Augmentation: fewest genes dropped per cell; None disables gene dropout."""

    upper: int | None = None
    """Augmentation: most genes dropped per cell; None disables gene dropout."""

    seed: int = 1
    """Seed of initialization, holdout split, batch order, dropout and augmentation."""

    checkpoint: bool = True
    """Write checkpoints during training (into ``checkpoint_dir``)."""

    checkpoint_dir: str | None = None
    """Where checkpoints go; None: ``checkpoints/`` inside the run directory."""

    checkpoint_every: int | None = 500
    """Steps between checkpoints (one is also written at the end of every epoch); None: only
    at epoch ends."""

    keep_checkpoints: int = 3
    """How many checkpoint files to keep, newest first; a damaged newest one is skipped (with a
    warning) for the one before it, so keep at least 2."""

    resume: bool = True
    """Continue from the newest complete checkpoint in ``checkpoint_dir`` when there is one
    (a requeued SLURM job picks up where it stopped)."""

    device_data: str = "auto"
    """Where batches are drawn: ``resident`` (the dataset decoded once into device memory),
    ``streamed`` (whole chunks sent per dispatch) or ``auto`` (resident when it fits 40 % of a
    device's memory, 25 % of RAM on CPU; the log says which and why). Same model either way."""

    steps_per_dispatch: int = 8
    """Train steps per dispatch to the devices (one ``lax.scan``)."""

    def __post_init__(self) -> None:
        _check_min("trainer.epochs", self.epochs, 1)
        _check_training_values(self, "trainer")


@dataclass
class AnnotateConfig:
    """``task=annotate``: a trained model applied to new cells."""

    model: str | None = None
    """Model file (``model.h5`` of a training run). Required for ``task=annotate``."""

    input: str | None = None
    """Cells to annotate: .h5ad, 10x .h5 or a 10x mtx folder. Required for ``task=annotate``."""

    output: str | None = None
    """Result table, parquet or CSV by extension; None: ``annotations.csv`` in the run dir."""

    batch_size: int = 1024
    """Cells per forward pass."""

    overwrite: bool = False
    """Replace an existing ``output``."""

    truth_key: str | None = None
    """Column of ``obs`` with known labels: adds a per-class report and a confusion matrix."""

    randomness: bool = False
    """Monte Carlo dropout: keep dropout on and average ``n_samples`` passes."""

    n_samples: int = 1
    """Forward passes per cell when ``randomness=true``."""

    gene_key: str | None = None
    """Column of the input's ``var`` with gene names; None: ``var_names``."""

    layer: str | None = None
    """Read counts from ``adata.layers[layer]`` instead of ``X`` (where a file keeps raw counts)."""

    min_gene_overlap: float | None = 0.5
    """Refuse to annotate when fewer than this fraction of the model's genes are in the input
    (a mouse model on human data, symbols in another case); null accepts any overlap."""

    backed: bool = False
    """Open an .h5ad input in backed mode (bounded memory)."""

    return_probs: bool = False
    """Also write per-class probabilities (a zarr store beside ``output``)."""

    return_attn: bool = False
    """Also write per-gene attention weights (a zarr store beside ``output``)."""

    seed: int = 123
    """Seed of Monte Carlo dropout."""

    min_confidence: Any = "auto"
    """Cells whose confidence is below this get the label ``Unassigned``: a number in [0, 1],
    ``auto`` (the threshold that leaves at most 1 % of the model's own holdout cells Unassigned,
    saved in the model by the trainer) or null (every cell gets a model label). A model file
    without saved confidences (ginseng < 0.2) annotates with a warning and no threshold."""

    over_clustering: str | None = None
    """Column of the input's ``obs`` with cluster labels: adds a ``majority_voting`` column,
    each cluster's most frequent label (Unassigned included)."""

    def __post_init__(self) -> None:
        mc = self.min_confidence
        if mc is not None and mc != "auto" and (
            isinstance(mc, bool) or not isinstance(mc, (int, float)) or not 0.0 <= float(mc) <= 1.0
        ):
            msg = f"annotate.min_confidence must be a number in [0, 1], auto or null, got {mc!r}"
            raise ValueError(msg)
        _check_min("annotate.batch_size", self.batch_size, 1)
        _check_min("annotate.n_samples", self.n_samples, 1)
        if self.min_gene_overlap is not None:
            _check_fraction("annotate.min_gene_overlap", self.min_gene_overlap, low_open=False)


@dataclass
class DistributedConfig:
    """How processes of a multi-process run find each other (``jax.distributed``)."""

    mode: DistributedMode = DistributedMode.none
    """``none``: one process, all its devices. ``local``: processes on this machine with a
    coordinator (``launch/local.sh``). ``slurm``: detected from SLURM (``srun``). ``auto``:
    detect."""

    coordinator_address: str | None = None
    """``host:port`` of process 0; None: ``GINSENG_COORDINATOR`` or 127.0.0.1:12355 (local),
    detected (slurm)."""

    num_processes: int | None = None
    """Number of processes; None: ``GINSENG_NUM_PROCESSES`` (local) or detected (slurm)."""

    process_id: int | None = None
    """This process's id; None: ``GINSENG_PROCESS_ID`` (local) or detected (slurm)."""

    local_device_ids: list[int] | None = None
    """Restrict this process to these local devices (e.g. one GPU per process)."""

    initialization_timeout: int = 300
    """Seconds to wait for every process to connect."""

    heartbeat_timeout_seconds: int | None = None
    """Seconds without a heartbeat before a process counts as dead and the run stops."""

    def __post_init__(self) -> None:
        _check_min("distributed.num_processes", self.num_processes, 1)
        _check_min("distributed.process_id", self.process_id, 0)
        if (
            self.num_processes is not None
            and self.process_id is not None
            and self.process_id >= self.num_processes
        ):
            _fail(f"distributed.process_id must be < distributed.num_processes, got "
                  f"process_id={self.process_id}, num_processes={self.num_processes}")
        _check_min("distributed.initialization_timeout", self.initialization_timeout, 1)
        _check_min("distributed.heartbeat_timeout_seconds", self.heartbeat_timeout_seconds, 1)


@dataclass
class GinsengConfig:
    """Everything one run of ``python -m ginseng.launch`` needs."""

    task: Task = Task.train
    """``prepare``: build the dataset. ``train``: prepare if needed, train, evaluate on the test
    cells, write model.h5, metrics.csv, training_curve.png. ``annotate``: model + input -> table."""

    silent: bool = False
    """Suppress progress bars and per-epoch reports."""

    overwrite: bool = False
    """Replace outputs that already exist in the run directory (model.h5, metrics, dataset, and
    the previous run's checkpoint: training starts over instead of resuming)."""

    data: DataConfig = field(default_factory=DataConfig)
    """Input data and the dataset store."""

    genes: GenesConfig = field(default_factory=GenesConfig)
    """Gene selection."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """Classifier shape and normalization."""

    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""

    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """Training loop."""

    annotate: AnnotateConfig = field(default_factory=AnnotateConfig)
    """``task=annotate`` settings."""

    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    """Multi-process settings (chosen with ``distributed=none|local|slurm``)."""


SCHEMA_NAME = "ginseng_schema"


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore (idempotent; done on import)."""
    cs = ConfigStore.instance()
    cs.store(name=SCHEMA_NAME, node=GinsengConfig)


register_configs()


def config_dir() -> Path:
    """Directory of the YAML configs: the packaged ``ginseng.configs`` when installed, else the
    repository's top-level ``configs/`` (a source checkout without an install)."""
    try:
        packaged = Path(str(resources.files("ginseng.configs")))
        if (packaged / "config.yaml").is_file():
            return packaged
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "configs"


class ConfigKeyError(ValueError):
    """An override names a key that the configuration does not have."""


def _schema_keys(node: Any) -> list[str]:
    return sorted(f.name for f in fields(node)) if is_dataclass(node) else []


def _check_key(dotted: str) -> None:
    node: Any = GinsengConfig
    seen: list[str] = []
    for part in dotted.split("."):
        valid = _schema_keys(node)
        if part not in valid:
            where = ".".join(seen) or "the top level of the config"
            close = difflib.get_close_matches(part, valid, n=1)
            hint = f" Did you mean {'.'.join([*seen, close[0]])!r}?" if close else ""
            prefix = ".".join(seen) + "." if seen else ""
            msg = (
                f"unknown config key {dotted!r}: {part!r} is not a key of {where}.{hint} "
                f"Valid keys: {', '.join(prefix + k for k in valid)}"
            )
            raise ConfigKeyError(msg)
        node = next(f for f in fields(node) if f.name == part).type
        node = _resolve_type(node)
        seen.append(part)
        if not is_dataclass(node):
            # A leaf (or a list/dict value): whatever follows indexes into the value.
            return


_TYPES = {
    c.__name__: c
    for c in (
        DataConfig, GenesConfig, ModelConfig, OptimConfig, TrainerConfig, AnnotateConfig,
        DistributedConfig,
    )
}


def _resolve_type(tp: Any) -> Any:
    # With postponed annotations, field types are strings; only nested sections matter here.
    if isinstance(tp, str):
        return _TYPES.get(tp, tp)
    return tp


# Config groups (chosen by name, not set as values) and Hydra's own settings are not checked.
_GROUPS = ("distributed",)


def validate_overrides(overrides: list[str]) -> None:
    """Check that every override names a key of the configuration.

    Hydra's own message for a misspelled key (``Key 'epoch' not in 'TrainerConfig'``) does not
    say which keys exist; this one does, with a suggestion.

    Raises
    ------
    ConfigKeyError
        For the first override whose key is not in :class:`GinsengConfig`.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides=list(overrides))
    for ov in parsed:
        key = ov.key_or_group
        if ov.is_delete() or key.startswith("hydra") or "/" in key or key in _GROUPS:
            continue
        if ov.package:  # 'group@pkg=option' selects a config group
            continue
        _check_key(key)


def compose(overrides: list[str] | None = None, return_hydra_config: bool = False) -> DictConfig:
    """Compose the configuration from Python, as ``python -m ginseng.launch`` would.

    Parameters
    ----------
    overrides : list of str, optional
        Hydra overrides, e.g. ``["task=prepare", "trainer.epochs=2"]``.
    return_hydra_config : bool
        Include the ``hydra`` node (needed to resolve ``hydra.run.dir``).

    Raises
    ------
    ConfigKeyError
        When an override names a key that does not exist (the message lists the valid keys).
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = list(overrides or [])
    validate_overrides(overrides)
    with initialize_config_dir(config_dir=str(config_dir()), version_base="1.3"):
        return hydra_compose(
            config_name="config", overrides=overrides, return_hydra_config=return_hydra_config
        )


def to_object(cfg: DictConfig | GinsengConfig) -> GinsengConfig:
    """Turn a composed ``DictConfig`` into a validated :class:`GinsengConfig`.

    Runs every section's ``__post_init__`` (value ranges); a ``GinsengConfig`` passes through.
    """
    if isinstance(cfg, GinsengConfig):
        return cfg
    if isinstance(cfg, DictConfig):
        cfg = OmegaConf.merge(OmegaConf.structured(GinsengConfig), cfg)
        # Hydra's own node is not part of the schema.
        if "hydra" in cfg:
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
        obj = OmegaConf.to_object(cfg)
        return obj  # type: ignore[return-value]
    msg = f"expected a DictConfig or GinsengConfig, got {type(cfg).__name__}"
    raise TypeError(msg)


def to_trainer_settings(cfg: GinsengConfig, workdir: str | os.PathLike | None = None):
    """Build the :class:`ginseng.train.GinsengTrainerSettings` of a configuration.

    Parameters
    ----------
    cfg : GinsengConfig
        The configuration.
    workdir : path, optional
        Run directory; checkpoints go to ``<workdir>/checkpoints`` unless
        ``trainer.checkpoint_dir`` says otherwise.
    """
    from ginseng.train import GinsengTrainerSettings

    t, m, o = cfg.trainer, cfg.model, cfg.optim
    checkpoint_dir = None
    if t.checkpoint:
        if t.checkpoint_dir is not None:
            checkpoint_dir = t.checkpoint_dir
        elif workdir is not None:
            checkpoint_dir = str(Path(workdir) / "checkpoints")
    values = {
        "rate": t.rate,
        "lam_max": t.lam_max,
        "lower": t.lower,
        "upper": t.upper,
        "hidden_dim": m.hidden_dim,
        "dropout_rate": m.dropout_rate,
        "batch_size": t.batch_size,
        "lr": o.lr,
        "lr_schedule": o.lr_schedule,
        "betas": tuple(float(b) for b in o.betas),
        "eps": o.eps,
        "weight_decay": o.weight_decay,
        "normalize": m.normalize,
        "target_sum": m.target_sum,
        "holdout_fraction": t.holdout_fraction,
        "balance_train": t.balance_train,
        "group_level": t.group_level,
        "group_mode": t.group_mode,
        "seed": t.seed,
        "checkpoint_dir": checkpoint_dir,
        "checkpoint_every": t.checkpoint_every,
        "keep_checkpoints": t.keep_checkpoints,
        "device_data": t.device_data,
        "steps_per_dispatch": t.steps_per_dispatch,
    }
    known = {f.name for f in fields(GinsengTrainerSettings)}
    # checkpoint_* arrive with the checkpoint work; pass only what the trainer knows.
    return GinsengTrainerSettings(**{k: v for k, v in values.items() if k in known})


def _field_docs(cls) -> dict[str, str]:
    """The attribute docstrings of a config dataclass (the string under each field)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, [*body[1:], None], strict=True):
        documented = isinstance(after, ast.Expr) and isinstance(getattr(after, "value", None), ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and documented:
            docs[node.target.id] = " ".join(str(after.value.value).split())
    return docs


def describe_keys(width: int = 100) -> str:
    """Every configuration key with its default and documentation, for ``--help``."""
    import textwrap

    lines = []

    def walk(cls, prefix: str) -> None:
        docs = _field_docs(cls)
        for f in fields(cls):
            tp = _resolve_type(f.type)
            if is_dataclass(tp):
                lines.append(f"\n[{prefix}{f.name}] {' '.join((tp.__doc__ or '').split())}")
                walk(tp, f"{prefix}{f.name}.")
                continue
            default = f.default if f.default is not MISSING else "(required)"
            default = getattr(default, "value", default)  # enums print as their value
            shown = "null" if default is None else str(default).lower() if isinstance(default, bool) else default
            lines.append(f"  {prefix}{f.name}={shown}")
            if f.name in docs:
                lines.extend(textwrap.wrap(docs[f.name], width, initial_indent="      ", subsequent_indent="      "))

    walk(GinsengConfig, "")
    return "\n".join(lines).lstrip("\n")
