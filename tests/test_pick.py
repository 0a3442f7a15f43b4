"""DoG picking kernels (jimray.pick), pick scoring, and picking a small simulated tomogram."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.ndimage import gaussian_filter

from jimray.pick import (
    dog_filter,
    dog_sigmas,
    find_peaks,
    halo_voxels,
    match_picks,
    pick_particles,
    pick_slab,
    slab_bounds,
)
from jimray.pick.dog import noise_statistics


def _blobs(shape, centres_xyz, sigma=2.0, amplitude=10.0) -> torch.Tensor:
    z, y, x = np.meshgrid(*(np.arange(n) for n in shape), indexing="ij")
    vol = np.zeros(shape, np.float32)
    for cx, cy, cz in centres_xyz:
        vol += amplitude * np.exp(-((x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2) / (2 * sigma**2))
    return torch.from_numpy(vol)


def test_dog_sigmas_rule():
    s1, s2 = dog_sigmas(200.0, 10.0)
    assert s1 == pytest.approx(0.5 * 10.0) and s2 == pytest.approx(1.6 * s1)
    assert dog_sigmas(200.0, 10.0, sigma_factor=0.3, sigma_ratio=2.0) == pytest.approx((3.0, 6.0))
    with pytest.raises(ValueError, match="particle_diameter_angstrom"):
        dog_sigmas(-5, 10)
    with pytest.raises(ValueError, match="sigma_ratio"):
        dog_sigmas(100, 10, sigma_ratio=1.0)


def test_dog_filter_matches_scipy(rng):
    vol = rng.standard_normal((20, 36, 40)).astype(np.float32)
    s1, s2 = 1.2, 2.0
    ours = dog_filter(torch.from_numpy(vol), s1, s2).numpy()
    ref = gaussian_filter(vol, s1, mode="mirror", truncate=8) - gaussian_filter(vol, s2, mode="mirror", truncate=8)
    inner = (slice(8, -8),) * 3
    # Fourier-space Gaussian vs sampled kernel: equal up to the sampling of a narrow Gaussian
    np.testing.assert_allclose(ours[inner], ref[inner], atol=1e-3)
    assert np.abs(ours - ref).max() < 0.02 * np.abs(ref).max()  # borders: only the far Gaussian tail differs


def test_dog_filter_batched_equals_loop(rng):
    vols = torch.from_numpy(rng.standard_normal((3, 12, 16, 20)).astype(np.float32))
    batched = dog_filter(vols, 1.0, 1.6)
    for i in range(3):
        torch.testing.assert_close(batched[i], dog_filter(vols[i], 1.0, 1.6))
    with pytest.raises(ValueError, match="sigma2"):
        dog_filter(vols, 2.0, 1.0)


def test_single_blob_is_found_exactly():
    centres = [(20, 17, 11)]
    vol = _blobs((24, 32, 40), centres) + 0.01 * torch.randn(24, 32, 40, generator=torch.Generator().manual_seed(0))
    res = pick_particles(vol, particle_diameter_angstrom=80, voxel_size_angstrom=10, threshold=5.0)
    assert len(res) == 1
    np.testing.assert_array_equal(res.coords_xyz[0], centres[0])
    assert res.scores[0] > 5
    dark = pick_particles(-vol, 80, 10, threshold=5.0)  # a dark blob is a DoG minimum: only its rim is picked
    assert np.linalg.norm(dark.coords_xyz - np.array(centres[0]), axis=1).min() > 2
    inverted = pick_particles(-vol, 80, 10, threshold=5.0, invert=True)
    np.testing.assert_array_equal(inverted.coords_xyz, res.coords_xyz)


def test_min_distance_and_edge_margin():
    vol = _blobs((24, 32, 48), [(10, 16, 12), (16, 16, 12), (36, 16, 12), (45, 16, 12)], sigma=1.5)
    vol += 0.01 * torch.randn(vol.shape, generator=torch.Generator().manual_seed(1))
    apart = pick_particles(vol, 40, 10, threshold=5.0, min_distance_voxels=3)
    assert sorted(apart.coords_xyz[:, 0].tolist()) == [10, 16, 36, 45]
    merged = pick_particles(vol, 40, 10, threshold=5.0, min_distance_voxels=8)
    xs = sorted(merged.coords_xyz[:, 0].tolist())
    assert len(xs) == 3 and xs[-2:] == [36, 45]
    assert np.all(np.diff(merged.scores) <= 0)  # sorted by decreasing score
    margin = pick_particles(vol, 40, 10, threshold=5.0, min_distance_voxels=3, edge_margin_voxels=4)
    assert sorted(margin.coords_xyz[:, 0].tolist()) == [10, 16, 36]


def test_find_peaks_keeps_only_the_core_and_reports_global_z():
    scores = torch.zeros(10, 8, 8)
    scores[2, 4, 4] = 9.0
    scores[7, 3, 3] = 8.0
    res = find_peaks(scores, 3.0, 2.0, z_offset=100, z_core=(100, 105), full_depth=200)
    np.testing.assert_array_equal(res.coords_xyz, [[4, 4, 102]])


def test_slab_bounds_tile_the_depth():
    bounds = slab_bounds(50, 16, 5)
    cores = [z for _, _, a, b in bounds for z in range(a, b)]
    assert cores == list(range(50))
    for read_start, read_stop, core_start, core_stop in bounds:
        assert read_start == max(0, core_start - 5) and read_stop == min(50, core_stop + 5)
    assert halo_voxels(100, 10) == math.ceil(4 * 1.6 * 2.5 + 2 * 5) + 1


def test_slabs_reproduce_the_whole_tomogram(rng):
    vol = torch.from_numpy(rng.standard_normal((60, 40, 40)).astype(np.float32))
    vol += _blobs((60, 40, 40), [(10, 10, 8), (30, 20, 29), (12, 30, 31), (25, 25, 50)], sigma=2.0, amplitude=3.0)
    args = dict(particle_diameter_angstrom=60.0, voxel_size_angstrom=10.0, threshold=2.5)
    whole = pick_particles(vol, **args)
    sigma1, sigma2 = dog_sigmas(60.0, 10.0)
    noise = noise_statistics(dog_filter(vol, sigma1, sigma2))
    halo = halo_voxels(60.0, 10.0)
    parts = [
        pick_slab(vol[a:b], a, (c, d), 60, noise=noise, **args) for a, b, c, d in slab_bounds(60, 16, halo)
    ]
    union = np.concatenate([p.coords_xyz for p in parts])
    assert len(whole) >= 4
    assert sorted(map(tuple, union)) == sorted(map(tuple, whole.coords_xyz))


def test_match_picks_against_brute_force(rng):
    for _ in range(20):
        picked = rng.uniform(0, 20, size=(rng.integers(0, 7), 3))
        true = rng.uniform(0, 20, size=(rng.integers(1, 7), 3))
        score = match_picks(picked, true, 5.0)
        best = 0  # maximum one-to-one matching by exhaustive search
        close = np.linalg.norm(picked[:, None] - true[None], axis=-1) <= 5.0
        if len(picked) >= len(true):
            perms = itertools.permutations(range(len(picked)), len(true))
            candidates = ([(p, j) for j, p in enumerate(perm)] for perm in perms)
        else:
            candidates = (list(enumerate(perm)) for perm in itertools.permutations(range(len(true)), len(picked)))
        for pairs in candidates:
            best = max(best, sum(bool(close[i, j]) for i, j in pairs))
        assert score.n_matched == best
        assert score.recall == pytest.approx(best / len(true))
        if len(picked):
            assert score.precision == pytest.approx(best / len(picked))
        for i, j in score.matches:
            assert np.linalg.norm(picked[i] - true[j]) <= 5.0


def test_match_picks_counts_exact_hits_once():
    true = np.array([[5.0, 5.0, 5.0], [20.0, 5.0, 5.0]])
    picked = np.array([[5.0, 5.0, 5.0], [6.0, 5.0, 5.0], [40.0, 5.0, 5.0]])
    score = match_picks(picked, true, 3.0)
    assert (score.n_matched, score.recall, score.precision) == (1, 0.5, pytest.approx(1 / 3))
    assert score.matches.tolist() == [[0, 0]] and score.mean_distance_voxels == 0.0


def test_picks_a_simulated_tomogram():
    from jimray.simulate.embedded import embedded_maps
    from jimray.simulate.tomogram import simulate_tomogram

    maps = embedded_maps(20.0, 16, names=["6zu5_ribosome", "4v8r_tric"])
    sim = simulate_tomogram(list(maps.values()), (32, 96, 96), 12, tilt_range_degrees=60, snr=0.5, seed=0)
    res = pick_particles(sim.tomogram, 200.0, 20.0, threshold=6.0)
    score = match_picks(res.coords_xyz, sim.coords, 200.0 / 2 / 20.0)
    assert score.recall >= 0.9 and score.precision >= 0.9, score


def test_bad_tomograms_raise():
    with pytest.raises(ValueError, match="non-finite"):
        pick_particles(torch.full((8, 8, 8), float("nan")), 40, 10)
    with pytest.raises(ValueError, match="constant"):
        pick_particles(torch.ones(8, 8, 8), 40, 10)
    with pytest.raises(ValueError, match=r"\(z, y, x\)"):
        pick_particles(torch.ones(8, 8), 40, 10)


def _simulated_mrc(tmp_path, name="tomo.mrc", seed=0, shape=(48, 64, 64)):
    from jimray.io.mrc import write_volume
    from jimray.simulate.embedded import embedded_maps
    from jimray.simulate.tomogram import simulate_tomogram

    maps = embedded_maps(20.0, 16, names=["6zu5_ribosome", "4v8r_tric"])
    sim = simulate_tomogram(list(maps.values()), shape, 10, tilt_range_degrees=60, snr=1.0, seed=seed)
    path = tmp_path / name
    write_volume(path, sim.tomogram.numpy(), 20.0)
    return path, sim


@pytest.mark.ray
def test_ray_picking_in_slabs_matches_whole_tomograms(ray_cluster, tmp_path):
    from jimray.data.pick import PickSettings, pick_tomograms, plan_pick_tasks

    first, sim = _simulated_mrc(tmp_path, "a.mrc", seed=0)
    second, _ = _simulated_mrc(tmp_path, "b.mrc", seed=1, shape=(32, 64, 64))
    settings = PickSettings(particle_diameter_angstrom=200.0, threshold=6.0, max_voxels_per_task=40 * 64 * 64)
    tasks = plan_pick_tasks([first, second], settings)
    assert sum(t.path == str(first) for t in tasks) >= 2  # the thick one is cut into slabs
    seen = []
    results = {r.path: r for r in pick_tomograms([first, second], settings, lambda k, n: seen.append((k, n)))}
    assert seen[-1] == (len(tasks), len(tasks)) and set(results) == {str(first), str(second)}
    whole = pick_particles(sim.tomogram, 200.0, 20.0, threshold=6.0)
    slabbed = results[str(first)].picks
    assert match_picks(slabbed.coords_xyz, whole.coords_xyz, 1.0).n_matched == len(whole) == len(slabbed)
    assert match_picks(slabbed.coords_xyz, sim.coords, 5.0).recall >= 0.9


@pytest.mark.ray
def test_cli_simulate_then_pick(ray_cluster, tmp_path):
    from typer.testing import CliRunner

    from jimray.cli.app import app
    from jimray.cli.errors import UserError
    from jimray.io.star import read_particles

    runner = CliRunner()
    sim_dir, pick_dir = tmp_path / "sim", tmp_path / "picks"
    args = ["simulate-tomogram", "--out", str(sim_dir), "--shape", "32", "96", "96", "--particles", "12", "--box",
            "16", "--voxel-size", "20", "--structure", "6zu5_ribosome", "--structure", "4v8r_tric", "--snr", "0.5"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    truth = read_particles(sim_dir / "tomogram_truth.star")
    assert truth.voxel_size_angstrom == 20.0 and len(truth.particles) == 12
    result = runner.invoke(app, ["pick", str(sim_dir / "tomogram.mrc"), "--particle-diameter", "200",
                                 "--threshold", "6", "--out", str(pick_dir)])
    assert result.exit_code == 0, result.output
    picks = read_particles(pick_dir / "picks.star")
    columns = ["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]
    assert {"rlnMicrographName", "rlnAutopickFigureOfMerit", *columns} <= set(picks.particles.columns)
    assert picks.particles["rlnMicrographName"].iloc[0] == str((sim_dir / "tomogram.mrc").resolve())
    per_tomogram = read_particles(pick_dir / "tomogram_picks.star").particles
    assert len(per_tomogram) == len(picks.particles)
    score = match_picks(picks.particles[columns].to_numpy(), truth.particles[columns].to_numpy(), 5.0)
    assert score.recall >= 0.9 and score.precision >= 0.9
    missing = runner.invoke(app, ["pick", str(tmp_path / "nope.mrc"), "--particle-diameter", "200",
                                  "--out", str(pick_dir)])
    assert isinstance(missing.exception, UserError) and "nope.mrc" in str(missing.exception)


def test_cut_boxes_centres_and_edges(rng):
    from jimray.pick.extract import boxes_inside, cut_boxes, sub_voxel_shifts

    tomo = torch.from_numpy(rng.standard_normal((20, 30, 40)).astype(np.float32))
    coords = np.array([[10.2, 12.0, 9.6], [3.0, 15.0, 10.0], [36.6, 15.0, 10.0], [35.0, 20.0, 14.0]])
    boxes, inside = cut_boxes(tomo, coords, 8)
    assert inside.tolist() == [True, False, False, True]
    assert boxes.shape == (2, 8, 8, 8)
    # the rounded coordinate sits at the box centre 8 // 2 = 4
    assert boxes[0, 4, 4, 4] == tomo[10, 12, 10] and boxes[1, 4, 4, 4] == tomo[14, 20, 35]
    torch.testing.assert_close(boxes[1], tomo[10:18, 16:24, 31:39])
    assert boxes_inside(np.array([[4, 4, 4], [36, 26, 16], [36, 26, 17]]), 8, (20, 30, 40)).tolist() == [
        True, True, False]
    np.testing.assert_allclose(sub_voxel_shifts(coords[:1]), [[0.2, 0.0, -0.4]], atol=1e-12)


def test_cli_extract_simulated_tomogram(tmp_path):
    from typer.testing import CliRunner

    from jimray.cli.app import app
    from jimray.io.mrc import read_volume
    from jimray.io.shards import list_shards, read_shard
    from jimray.io.star import read_particles

    runner = CliRunner()
    sim_dir, out = tmp_path / "sim", tmp_path / "extracted"
    result = runner.invoke(app, ["simulate-tomogram", "--out", str(sim_dir), "--shape", "32", "80", "80",
                                 "--particles", "10", "--box", "16", "--voxel-size", "20", "--seed", "3"])
    assert result.exit_code == 0, result.output
    truth = read_particles(sim_dir / "tomogram_truth.star").particles
    result = runner.invoke(app, ["extract", "--particles", str(sim_dir / "tomogram_truth.star"), "--box", "24",
                                 "--out", str(out), "--truth"])
    assert result.exit_code == 0, result.output
    skipped = pd.read_csv(out / "skipped.csv")
    shards = [read_shard(p) for p in list_shards(out)]
    ids = np.concatenate([s["id"] for s in shards])
    assert len(skipped) > 0 and len(ids) + len(skipped) == 10  # a 24 box does not fit around every particle
    assert set(ids).isdisjoint(skipped["row"]) and "outside" in skipped["reason"].iloc[0]
    assert "skipped particle" in result.output
    tomo, _ = read_volume(sim_dir / "tomogram.mrc")
    first = shards[0]
    x, y, z = np.rint(truth.loc[first["id"][0], ["rlnCoordinateX", "rlnCoordinateY", "rlnCoordinateZ"]]).astype(int)
    np.testing.assert_array_equal(first["volume"][0], tomo[z - 12 : z + 12, y - 12 : y + 12, x - 12 : x + 12])
    assert first["true_class"][0] == truth.loc[first["id"][0], "rlnClassNumber"] - 1
    assert first["voxel_size_angstrom"][0] == 20.0 and first["tilt_range_degrees"][0] == 60.0
    again = runner.invoke(app, ["extract", "--particles", str(sim_dir / "tomogram_truth.star"), "--box", "24",
                                "--out", str(out)])
    assert "already holds" in str(again.exception)
