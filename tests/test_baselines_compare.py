"""``jimray bench compare`` plumbing: simulated levels, true pair poses, the method registry, the metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jimray.bench import compare
from jimray.geometry.rigid import transform_volumes

SMALL = ("3pwp_tcr_pmhc", "7ddo_ace2_rbd")


@pytest.fixture(autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def options(**kw) -> compare.CompareOptions:
    base = dict(snrs=(math.inf,), structures=SMALL, per_class=3, pairs=4, tilt_range_degrees=90.0, box_size=16)
    return compare.CompareOptions(**{**base, **kw})


def test_pair_truth_carries_source_onto_target():
    ds = compare.make_dataset(math.inf, options())
    assert ds.pairs.shape == (4, 2)
    assert np.all(ds.classes[ds.pairs[:, 0]] == ds.classes[ds.pairs[:, 1]])
    moved = transform_volumes(ds.volumes[ds.pairs[:, 0]], ds.pair_rotations, ds.pair_shifts)
    for a, b in zip(moved, ds.volumes[ds.pairs[:, 1]], strict=True):
        assert np.corrcoef(a.flatten().numpy(), b.flatten().numpy())[0, 1] > 0.9


def test_registered_method_is_run_and_scored(monkeypatch):
    def oracle_factory(opts):
        def run(ds):
            return compare.MethodResult(labels=ds.classes + 5, pair_rotations=ds.pair_rotations,
                                        pair_shifts=ds.pair_shifts)
        return run

    def worst_factory(opts):
        def run(ds):
            return compare.MethodResult(labels=np.zeros_like(ds.classes))
        return run

    monkeypatch.setitem(compare._EXTRA_METHODS, "oracle", oracle_factory)
    monkeypatch.setitem(compare._EXTRA_METHODS, "one-cluster", worst_factory)
    rows = compare.run_compare(options(snrs=(100.0,)), only=["oracle", "one-cluster"])
    by_name = {r["method"]: r for r in rows}
    assert set(by_name) == {"oracle", "one-cluster", "Jim-Net (paper)"}
    assert by_name["oracle"]["clustering_accuracy"] == 100.0
    assert by_name["oracle"]["rotation_error_mean"] < 1e-6 and by_name["oracle"]["translation_error_mean"] < 1e-6
    assert by_name["one-cluster"]["clustering_accuracy"] == 50.0
    assert math.isnan(by_name["one-cluster"]["rotation_error_mean"])
    assert by_name["Jim-Net (paper)"]["clustering_accuracy"] == 100.0
    assert all(set(compare.COLUMNS) <= set(r) for r in rows if r["method"] != "Jim-Net (paper)")
    with pytest.raises(ValueError, match="unknown method"):
        compare.run_compare(options(), only=["no-such-method"])


def test_classical_methods_run_on_a_tiny_level():
    opts = options(per_class=3, pairs=2, angular_step_degrees=60.0, refine_steps=1, mra_iterations=1,
                   tilt_range_degrees=60.0, pca_components=3)
    ds = compare.make_dataset(100.0, opts)
    for name, method in compare.build_methods(opts).items():
        row = compare.evaluate(name, ds, method(ds), seconds=1.0)
        assert row["seconds_per_subtomogram"] > 0
        if "search" in name or "MRA" in name:
            assert 0.0 <= row["rotation_error_mean"] <= 2 * math.sqrt(2) + 1e-6
        if "search" not in name:
            assert 50.0 <= row["clustering_accuracy"] <= 100.0
