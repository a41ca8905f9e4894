"""Accuracy on real data (issue 2), default GinsengTrainerSettings, 2,000 HVGs of the training cells.

Slow (each case trains a model on real data): run with ``python -m pytest -q -m slow
tests/test_accuracy.py``. The full figures over several seeds, with the logistic-regression anchor,
come from benchmarks/bench_accuracy.py and are recorded in benchmarks/RESULTS.md.
"""

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import bench_accuracy as ba

from ginseng.train import GinsengTrainerSettings


def test_macro_f1_matches_hand_computation():
    truth = np.array(["a", "a", "b", "b", "c"])
    pred = np.array(["a", "b", "b", "b", "a"])
    # a: tp1 fp1 fn1 -> 0.5 ; b: tp2 fp1 fn0 -> 0.8 ; c: tp0 fp0 fn1 -> 0
    assert ba.macro_f1(truth, pred) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert ba.macro_f1(truth, truth) == 1.0


def test_stratified_holdout_is_per_label_seeded_and_disjoint():
    labels = np.array(["x"] * 50 + ["y"] * 10 + ["z"] * 2)
    train, test = ba.stratified_holdout(labels, 0.2, seed=3)
    assert np.intersect1d(train, test).size == 0
    assert np.union1d(train, test).size == labels.size
    counts = {k: int(np.sum(labels[test] == k)) for k in "xyz"}
    assert counts == {"x": 10, "y": 2, "z": 1}  # every label keeps at least one test cell
    again, _ = ba.stratified_holdout(labels, 0.2, seed=3)
    other, _ = ba.stratified_holdout(labels, 0.2, seed=4)
    assert np.array_equal(train, again) and not np.array_equal(train, other)


# Measured at the defaults (benchmarks/RESULTS.md, section 6f): pbmc3k seed 0 0.895 (mean of 20
# splits 0.902; split to split the value moves 0.856-0.947, so this pins a regression floor below
# the 0.89, which the mean meets); baron seed 0 0.978 (mean 0.977 over 20 trainer seeds:
# the 0.97 is asserted as is).
PBMC3K_FLOOR = 0.87


@pytest.mark.slow
def test_pbmc3k_holdout_macro_f1_at_defaults(tmp_path):
    train, test = ba.pbmc3k_split(seed=0)
    assert int(train.var["ginseng_genes"].sum()) == ba.N_HVG
    f1 = ba.run_ginseng(train, test, GinsengTrainerSettings(seed=0), epochs=10, workdir=tmp_path)
    assert f1 >= PBMC3K_FLOOR, f"pbmc3k macro-F1 {f1:.3f} < {PBMC3K_FLOOR}"


@pytest.mark.slow
def test_baron_mouse1_to_mouse2_macro_f1_at_defaults(tmp_path):
    train, test = ba.baron_split()
    assert set(test.obs["cell_type"].astype(str)) <= set(train.obs["cell_type"].astype(str))
    f1 = ba.run_ginseng(train, test, GinsengTrainerSettings(seed=0), epochs=10, workdir=tmp_path)
    assert f1 >= ba.TARGETS["baron"], f"baron macro-F1 {f1:.3f} < {ba.TARGETS['baron']}"
