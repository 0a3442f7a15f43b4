"""``jimray bench compare`` plumbing: simulated levels, true pair poses, the method registry, the metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from jimray.bench import compare, methods
from jimray.conventions import clustering_accuracy, rotation_error
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

    monkeypatch.setitem(methods._REGISTERED, "oracle", oracle_factory)
    monkeypatch.setitem(methods._REGISTERED, "one-cluster", worst_factory)
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
    n, m = len(ds.classes), len(ds.pairs)
    ran = set()
    for name, method in compare.build_methods(opts).items():
        if name.startswith("Jim-Net"):
            continue  # trained through Ray Train: tests/test_bench_jimnet.py
        result = method(ds)
        row = compare.evaluate(name, ds, result, seconds=1.0)
        ran.add(name.split(" (")[0].split(",")[0])
        assert row["seconds_per_subtomogram"] == pytest.approx(1.0 / (n if result.labels is not None else m))
        if "search" in name or "MRA" in name or "common frame" in name:  # pair poses: rotations, scored as such
            r = result.pair_rotations.double()
            assert r.shape == (m, 3, 3) and result.pair_shifts.shape == (m, 3)
            assert torch.allclose(r @ r.transpose(1, 2), torch.eye(3, dtype=r.dtype).expand(m, 3, 3), atol=1e-4)
            assert torch.allclose(torch.linalg.det(r), torch.ones(m, dtype=r.dtype), atol=1e-4)
            assert row["rotation_error_mean"] == pytest.approx(
                float(rotation_error(ds.pair_rotations, result.pair_rotations).mean()))
        else:
            assert result.pair_rotations is None and math.isnan(row["rotation_error_mean"])
        if "search" in name:
            assert result.labels is None and math.isnan(row["clustering_accuracy"])
        else:  # one label per subtomogram, at most K clusters, scored by the paper's metric
            labels = np.asarray(result.labels)
            assert labels.shape == (n,) and len(np.unique(labels)) <= ds.n_classes
            assert row["clustering_accuracy"] == pytest.approx(100.0 * clustering_accuracy(ds.classes, labels))
    assert {"true poses", "rotation-invariant features", "common frame", "constrained-CC search", "MRA",
            "PCA + k-means", "PCA + GMM"} <= ran
