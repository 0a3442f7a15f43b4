"""The pytme peer (issue 15): its rotation and shift conventions against ours on noiseless pairs, and the
conversions themselves. The pytme tests skip, saying how to install it, when pytme is not importable."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from jimray.baselines import pytme_peer
from jimray.conventions import rotation_error, translation_error
from jimray.fourier.masks import wedge_masks
from jimray.geometry.rigid import transform_volumes
from jimray.simulate.embedded import embedded_maps
from jimray.simulate.subtomogram import apply_fourier_filter

needs_pytme = pytest.mark.skipif(
    not pytme_peer.pytme_available(),
    reason=f"pytme is not installed (optional benchmark peer): {pytme_peer.INSTALL_HINT}",
)
BOX = 32
GRID_INDEX = (37, 211)  # two rotations of pytme's 30-degree set
SHIFTS = ((1.0, -2.0, 1.0), (-1.5, 0.5, 2.0))  # voxels, x y z


@pytest.fixture(scope="module")
def ribosome() -> torch.Tensor:
    return next(iter(embedded_maps(box_size=BOX, names=["6zu5_ribosome"]).values())).float()


def _posed(volume: torch.Tensor, rotations: np.ndarray, shifts) -> torch.Tensor:
    r = torch.as_tensor(rotations, dtype=torch.float32)
    return transform_volumes(volume[None].expand(len(r), *volume.shape), r, torch.tensor(shifts))


def test_conversions_are_exact_algebra():
    rng = np.random.default_rng(0)
    from scipy.spatial.transform import Rotation

    rp = Rotation.random(5, random_state=rng).as_matrix()
    ours = pytme_peer.rotation_to_ours(rp)
    assert np.allclose(pytme_peer.rotation_to_ours(ours), rp)  # its own inverse
    assert np.allclose(np.linalg.det(ours), 1.0)
    s = np.array([1.0, -2.0, 3.0])
    assert np.allclose(pytme_peer.shift_to_ours(s, np.eye(3), (BOX,) * 3), s)  # no rotation: the shift as is
    assert np.allclose(pytme_peer.shift_to_ours(s, ours[0], (33,) * 3), s)  # odd box: both centres at 16
    flip = np.diag([-1.0, -1.0, 1.0])  # 180 degrees about z moves the half-voxel centre offset by (-1, -1, 0)
    assert np.allclose(pytme_peer.shift_to_ours(s, flip, (BOX,) * 3), s + [-1.0, -1.0, 0.0])


def test_missing_pytme_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tme", None)
    with pytest.raises(ImportError, match=r"pip install 'jimray\[peer\]'"):
        pytme_peer.require_pytme()
    assert not pytme_peer.pytme_available()
    with pytest.raises(ValueError, match="wedge_filter"):
        pytme_peer.PytmeOptions(wedge_filter="source")


@needs_pytme
def test_pytme_pose_on_a_noiseless_pair_is_ours(ribosome):
    """A pair posed with rotations ON pytme's 30-degree set, R = P R_p^T P: pytme's answer, converted, is the
    true pose in our convention (rotation exact, shift to sub-voxel precision despite the 15.5 vs 16 centres)."""
    rp = pytme_peer.pytme_rotations(30.0)[list(GRID_INDEX)]
    truth = pytme_peer.rotation_to_ours(rp)
    targets = _posed(ribosome, truth, SHIFTS)
    res = pytme_peer.align_pairs_pytme(ribosome, targets, 90.0, angular_step_degrees=30.0)
    assert res.rotations.shape == (2, 3, 3) and res.shifts.shape == (2, 3) and res.scores.shape == (2,)
    assert np.all(rotation_error(truth, res.rotations) < 0.2)
    assert np.all(translation_error(torch.tensor(SHIFTS), res.shifts) < 0.25)  # measured 0.03-0.05
    # the check has teeth: the other natural guesses are far off for these rotations
    naive = pytme_peer._P @ rp @ pytme_peer._P
    assert np.all(rotation_error(truth, naive) > 0.2)
    centre_offset = (truth - np.eye(3)) @ np.full(3, 0.5)
    assert np.all(np.linalg.norm(centre_offset, axis=-1) > 0.5)


@needs_pytme
def test_pytme_intended_use_wedged_particles_against_a_complete_reference(ribosome):
    """Particles with a 30-degree missing wedge (tilt range 60) against the wedge-free map, the target's wedge
    on the rotated template: the poses are the true ones (particle ~ transform(reference, R, t))."""
    truth = pytme_peer.rotation_to_ours(pytme_peer.pytme_rotations(30.0)[list(GRID_INDEX[1:])])
    particles = apply_fourier_filter(_posed(ribosome, truth, SHIFTS[1:]), wedge_masks((BOX,) * 3, 60.0)[0])
    res = pytme_peer.align_to_reference_pytme(particles, ribosome, 60.0, wedge_filter="target")
    assert np.all(rotation_error(truth, res.rotations) < 0.2)
    assert np.all(translation_error(torch.tensor(SHIFTS[1:]), res.shifts) < 1.0)


def test_pytme_rows_of_compare_are_opt_in():
    from jimray.bench import compare, methods, peer

    names = list(compare.build_methods(compare.CompareOptions()))
    assert not any("pytme" in name for name in names)  # not in the default all-methods run
    assert set(peer.PAIR_NAMES.values()) | {peer.REFERENCE_NAME} <= set(methods.registered_methods())


def test_ratio_note_uses_the_fastest_classical_row_at_equal_error():
    from jimray.bench import peer

    def row(method, step, seconds, error):
        return {"method": method, "angular_step_degrees": step, "seconds_per_pair": seconds,
                "pair_rotation_error_mean": error}

    rows = [row("search", 30.0, 2.0, 0.8), row("search", 15.0, 9.0, 0.3), row("pytme", 15.0, 12.0, 0.2),
            {"method": peer.JIMNET_NAME, "seconds_per_pair": 0.03, "pair_rotation_error_mean": 0.35}]
    assert "search at 15 deg (9 s/pair); Jim-Net's single pass is 300x faster" in peer.ratio_note(rows)
    rows[-1]["pair_rotation_error_mean"] = float("nan")
    assert "not established" in peer.ratio_note(rows)


@needs_pytme
def test_pytme_rows_run_in_compare_when_asked():
    import math

    from jimray.bench import compare, peer

    opts = compare.CompareOptions(snrs=(100.0,), structures=("3pwp_tcr_pmhc", "7ddo_ace2_rbd"), per_class=2,
                                  pairs=2, box_size=16, pytme=True)
    rows = compare.run_compare(opts, only=["pytme"])
    by_name = {r["method"]: r for r in rows}
    assert set(peer.PAIR_NAMES.values()) | {peer.REFERENCE_NAME} <= set(by_name)
    for name in [*peer.PAIR_NAMES.values(), peer.REFERENCE_NAME]:
        assert math.isfinite(by_name[name]["rotation_error_mean"]) and by_name[name]["threads"] == 1
