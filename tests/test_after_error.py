"""After an error the process goes on (issue: a damaged checkpoint froze the next zarr write).

Each scenario runs in a child process (tests/_after_error_worker.py) with a timeout, so that a
hang fails the test instead of freezing the suite: errors first, then create -> train -> annotate
in the same process, then no thread ginseng started may be alive and no file it opened open.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORKER = HERE / "_after_error_worker.py"


def _run_worker(*args, timeout):
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONFAULTHANDLER": "1"}
    try:
        proc = subprocess.run(
            [sys.executable, str(WORKER), *map(str, args)],
            capture_output=True, text=True, timeout=timeout, env=env, cwd=HERE.parent, check=False,
        )
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"the process hung (no exit within {timeout} s); its last output:\n{out[-3000:]}")
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "AFTER-ERROR OK" in proc.stdout, text[-5000:]
    return proc.stdout


def test_damaged_checkpoint_falls_back_and_the_process_goes_on(tmp_path):
    # The newest of 3 checkpoints damaged in the middle: warning, resume from the one before,
    # bit-identical result; all damaged: one error naming every file; then ordinary work.
    _run_worker("damaged-checkpoint", tmp_path, timeout=300)


def _readme_bad_input_tests() -> dict[str, str]:
    """The tests the README's bad-input table names, as {test name: file it is defined in}."""
    readme = (HERE.parent / "README.md").read_text()
    section = readme[readme.index("## Bad input") :]
    section = section[: section.index("\n## ", 1)]
    names = set(re.findall(r"`(test_\w+)`", section))
    where = {}
    for path in sorted(HERE.glob("test_*.py")):
        for name in re.findall(r"^def (test_\w+)", path.read_text(), re.MULTILINE):
            if name in names:
                where[name] = path.name
    missing = sorted(names - set(where))
    assert not missing, f"the README's bad-input table names tests that do not exist: {missing}"
    return where


@pytest.mark.slow
def test_every_bad_input_row_then_ordinary_work_in_one_process(tmp_path):
    where = _readme_bad_input_tests()
    assert len(where) >= 60
    ids = sorted(f"tests/{file}::{name}" for name, file in where.items())
    out = _run_worker("bad-input-sweep", tmp_path, *ids, timeout=600)
    (passed,) = re.findall(r"SWEEP (\d+) passed", out)
    assert int(passed) >= len(ids)  # parametrized rows run once per case
