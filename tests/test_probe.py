"""eval.probe: the linear-probe protocol on features with a known structure (the entry point on a trained
CLIP: tests/test_clip_eval_export.py)."""

import numpy as np
import pytest

from eval.probe import linear_probe, stratified_split


def _gaussians(n, seed=0):
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(99).normal(size=(5, 16)) * 0.6
    y = rng.integers(0, 5, n)
    return means[y] + rng.normal(size=(n, 16)), y


def test_stratified_split_keeps_every_class():
    y = np.array([0] * 50 + [1] * 30 + [2] * 3)
    take, rest = stratified_split(y, 0.1, np.random.default_rng(0))
    assert sorted(np.bincount(y[take]).tolist()) == [1, 3, 5]  # round(0.1 * n), at least one
    assert len(set(take) & set(rest)) == 0 and len(take) + len(rest) == len(y)


def test_more_labels_probe_better_and_runs_are_reproducible():
    """Separable-but-noisy classes: accuracy at 1% < 10% <= 100% of the labels (more data, better boundary),
    the chosen C comes from the validation split, and the same seeds give the same numbers."""
    tx, ty = _gaussians(3000, 0)
    sx, sy = _gaussians(1000, 1)
    r = linear_probe(tx, ty, sx, sy, 5, fractions=(0.01, 0.1, 1.0), seeds=(0, 1))
    acc = {f: s["accuracy"]["mean"] for f, s in r["by_fraction"].items()}
    assert acc["0.01"] + 0.05 < acc["0.1"] <= acc["1.0"] + 0.005, acc
    assert r["by_fraction"]["1.0"]["num_train"] == 2700 and len(r["runs"]) == 6
    assert all(run["C"] in (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0) and run["num_val"] == 300 for run in r["runs"])
    assert linear_probe(tx, ty, sx, sy, 5, fractions=(0.1,), seeds=(0,))["runs"] == \
        [x for x in r["runs"] if x["fraction"] == 0.1 and x["seed"] == 0]


def test_a_fraction_with_one_class_is_an_error():
    x, y = np.zeros((4, 2)), np.array([0, 0, 0, 1])
    with pytest.raises(ValueError, match="one class only"):
        linear_probe(x, y, x, y, 2, fractions=(0.5,), seeds=(0,), val_fraction=0.5)
