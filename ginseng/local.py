"""Several training processes on this machine: ``python -m ginseng.local N DEVICES [overrides]``.

The installed form of ``launch/local.sh`` (also the ``ginseng-local`` console script): it starts N
processes of ``python -m ginseng.launch distributed=local`` with a coordinator on 127.0.0.1, each
with DEVICES devices, in one run directory, and stops them all if one fails.
"""

from __future__ import annotations

import os
import sys
from importlib import resources
from pathlib import Path


def script_path() -> Path:
    """``local.sh`` as installed (``ginseng.launchers``), else the source checkout's ``launch/``."""
    try:
        packaged = Path(str(resources.files("ginseng.launchers") / "local.sh"))
        if packaged.is_file():
            return packaged
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parent.parent / "launch" / "local.sh"


def main() -> None:
    env = {**os.environ, "PYTHON": os.environ.get("PYTHON", sys.executable)}
    os.execvpe("bash", ["bash", str(script_path()), *sys.argv[1:]], env)


if __name__ == "__main__":
    main()
