"""``python -m ginseng.launch`` (and the ``ginseng`` console script): the Hydra application.

Thin on purpose: it composes the configuration (YAML in ``configs/``, schema in
:mod:`ginseng.config`), connects the processes of a multi-process run
(:func:`ginseng.distributed.initialize`) and calls :func:`ginseng.tasks.run` with the run
directory. Everything it does can be called from Python.

Examples
--------
::

    python -m ginseng.launch                                   # train on the embedded pbmc3k
    python -m ginseng.launch data.path=my.h5ad data.labels=cell_type trainer.epochs=30
    python -m ginseng.launch task=annotate annotate.model=outputs/.../model.h5 \\
        annotate.input=new.h5ad annotate.output=cells.parquet
    python -m ginseng.launch --multirun model.hidden_dim=128,256
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import OverrideParseException
from omegaconf import DictConfig

from ginseng import tasks
from ginseng.config import ConfigKeyError, config_dir, to_object, validate_overrides

__all__ = ["main"]

RUN_DIR_ENV = "GINSENG_RUN_DIR"


@hydra.main(config_path=str(config_dir()), config_name="config", version_base="1.3")
def _app(cfg: DictConfig):
    from ginseng import distributed

    conf = to_object(cfg)
    d = conf.distributed
    distributed.initialize(
        mode=d.mode.value,
        coordinator_address=d.coordinator_address,
        num_processes=d.num_processes,
        process_id=d.process_id,
        local_device_ids=d.local_device_ids,
        initialization_timeout=d.initialization_timeout,
        heartbeat_timeout_seconds=d.heartbeat_timeout_seconds,
    )
    workdir = HydraConfig.get().runtime.output_dir
    log_file = _hydra_log_file()
    with _tee_stdout(log_file), warnings.catch_warnings():
        # A warning is for the user: one line, not a line of ginseng's source under it.
        warnings.showwarning = _show_warning
        try:
            tasks.run(conf, workdir)
        except USER_ERRORS as err:
            if distributed.process_index() == 0:
                _drop_empty_run_dir(Path(workdir))
            if os.environ.get("HYDRA_FULL_ERROR") == "1":
                raise
            # A mistake in the input or the overrides: one line that says what is wrong, not a
            # traceback through ginseng's internals (HYDRA_FULL_ERROR=1 shows it).
            text = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
            line = f"Error: {text}"
            print(line, file=sys.stderr)
            print("(set HYDRA_FULL_ERROR=1 to see the traceback)", file=sys.stderr)
            if log_file is not None:
                with open(log_file, "a") as fh:
                    fh.write(line + "\n")
            sys.stdout.flush()
            sys.stderr.flush()
            if distributed.process_count() > 1:
                os._exit(1)  # see distributed.initialize(exit_on_error=...)
            sys.exit(1)


def _drop_empty_run_dir(workdir: Path) -> None:
    """After an input error, remove the timestamped run directory Hydra made for this run when it
    holds nothing but Hydra's own bookkeeping (.hydra/, launch.log): no empty outputs/<date>/<time>/
    per typo. A directory the user named (hydra.run.dir, GINSENG_RUN_DIR) is left alone."""
    import shutil

    if os.environ.get(RUN_DIR_ENV) or any(o.startswith("hydra.run.dir=") for o in _command_line_overrides(sys.argv[1:])):
        return
    if not workdir.is_dir() or not set(os.listdir(workdir)) <= {".hydra", "launch.log"}:
        return
    shutil.rmtree(workdir, ignore_errors=True)
    for folder in (workdir.parent, workdir.parent.parent):  # the date folder, then outputs/
        with contextlib.suppress(OSError):
            folder.rmdir()  # only when empty


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    name = "Warning" if category is UserWarning else category.__name__
    print(f"{name}: {message}", file=sys.stderr, flush=True)


# Exceptions that ginseng raises for bad input, bad settings or an existing output; anything
# else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError)


def _hydra_log_file() -> str | None:
    """The file of Hydra's job log (``<run dir>/launch.log``), if Hydra configured one."""
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            return handler.baseFilename
    return None


class _Tee(io.TextIOBase):
    """Write to the console and to the run's log file (what a user reads later)."""

    def __init__(self, console, path: str):
        self._console = console
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()

    def write(self, text: str) -> int:
        self._console.write(text)
        self._file.write(text)
        if "\n" in text:
            self._file.flush()
        return len(text)

    def flush(self) -> None:
        self._console.flush()
        self._file.flush()

    def isatty(self) -> bool:
        return self._console.isatty()

    def fileno(self) -> int:
        return self._console.fileno()

    def close(self) -> None:
        self._file.close()


@contextlib.contextmanager
def _tee_stdout(path: str | None):
    """Copy what the run prints (per-epoch lines, the test report) into Hydra's job log."""
    if path is None:
        yield
        return
    original = sys.stdout
    tee = _Tee(original, path)
    sys.stdout = tee
    try:
        yield
    finally:
        sys.stdout = original
        tee.close()


def _command_line_overrides(argv: list[str]) -> list[str]:
    # Hydra's own argument parser separates overrides from flags like --multirun or --cfg job.
    try:
        from hydra._internal.utils import get_args_parser

        args, _ = get_args_parser().parse_known_args(argv)
        return list(args.overrides or [])
    except (ImportError, SystemExit):  # let Hydra report a bad command line itself
        return []


def _share_run_dir() -> None:
    """Make every process of one multi-process run use one run directory.

    Hydra names the run directory after the time each process started, so the ranks of one run
    would each write to their own. ``launch/local.sh`` and ``launch/slurm.sbatch`` set
    GINSENG_RUN_DIR; under ``srun`` without it, the SLURM job id (shared by all tasks and kept
    across requeues, so a requeued job resumes in the same place) names the directory.
    """
    if os.environ.get(RUN_DIR_ENV):
        return
    job = os.environ.get("SLURM_JOB_ID")
    if job and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        os.environ[RUN_DIR_ENV] = os.path.join("outputs", f"slurm-{job}")
        return
    n = os.environ.get("GINSENG_NUM_PROCESSES")
    if n and n.isdigit() and int(n) > 1:
        msg = (
            f"GINSENG_NUM_PROCESSES={n} but {RUN_DIR_ENV} is not set: every process would write "
            f"to its own timestamped run directory. Set {RUN_DIR_ENV} to one directory for all "
            "processes (launch/local.sh does this)."
        )
        raise SystemExit(f"Error: {msg}")


HELP = """ginseng: train a cell-type classifier and annotate cells (a Hydra application).

usage: python -m ginseng.launch [key=value ...]        (or: ginseng [key=value ...])
       python -m ginseng.launch --multirun key=a,b ...   one run per value
       python -m ginseng.launch --cfg job                the composed config
       ginseng-local N DEVICES_PER_PROCESS [key=value ...]  N processes on this machine

Outputs go to outputs/<date>/<time>/ (hydra.run.dir=... to choose). Every key, its default and
what it does:

"""


def _check_values(overrides: list[str]) -> None:
    """Compose once so that a value of the wrong type ('trainer.epochs=three') is one line, not
    OmegaConf's multi-line report."""
    from hydra.errors import ConfigCompositionException
    from omegaconf.errors import OmegaConfBaseException

    from ginseng.config import compose

    try:
        to_object(compose(overrides))
    except (OmegaConfBaseException, ConfigCompositionException) as caught:
        err = caught.__cause__ if isinstance(caught.__cause__, OmegaConfBaseException) else caught
        key = getattr(err, "full_key", None) or "a value"
        given = next((o.split("=", 1)[1] for o in overrides if o.split("=", 1)[0].lstrip("+~") == key), None)
        first = str(err).splitlines()[0]
        raise ConfigKeyError(f"{key}={given}: {first}" if given is not None else first) from None


def main() -> None:
    """Entry point of ``python -m ginseng.launch`` and the ``ginseng`` console script."""
    argv = sys.argv[1:]
    if any(a in ("--help", "-h") for a in argv):
        from ginseng.config import describe_keys

        print(HELP + describe_keys() + "\n\nHydra's own options: --hydra-help")
        return
    try:
        overrides = _command_line_overrides(argv)
        validate_overrides(overrides)
        if not any(a in ("--multirun", "-m") for a in argv) and not any("," in o for o in overrides):
            _check_values(overrides)
    except ConfigKeyError as err:
        print(f"Error: {err}", file=sys.stderr)
        sys.exit(2)
    except OverrideParseException:  # a malformed override: Hydra explains it below
        pass
    _share_run_dir()
    _app()


if __name__ == "__main__":
    main()
