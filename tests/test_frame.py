"""Common-frame embedding: orientation invariance, mode-seeking purity, clustering of an easy set, and the
two-process (gloo) frame step equal to the single-process one."""

from __future__ import annotations

import os

import numpy as np
import torch

from jimray.cluster.frame import (
    FrameOptions,
    choose_seeds,
    frame_scores,
    gather_volumes,
    spherical_mask,
    update_references,
)
from jimray.cluster.invariant import invariant_features
from jimray.cluster.reduce import LocalReducer, TorchDistributedReducer
from jimray.conventions import clustering_accuracy
from jimray.geometry.rigid import transform_volumes
from jimray.simulate.embedded import embedded_maps
from jimray.simulate.subtomogram import simulate_subtomograms
from jimray.train.frame_step import FrameRound, frame_step

OPTIONS = FrameOptions(n_references=6, members_per_reference=4, max_shift_voxels=2.0)


def _easy_set(per_class=8, snr=10.0, box=16, names=("6zu5_ribosome", "6msm_cftr")):
    maps = embedded_maps(voxel_size_angstrom=20.0, box_size=box, names=list(names))
    sim = simulate_subtomograms(list(maps.values()), per_class, snr, 60.0, max_shift_voxels=1.0, seed=3)
    return sim.volumes, sim.classes.numpy(), list(maps.values())


def test_spherical_mask_is_one_inside_and_zero_outside():
    mask = spherical_mask((16, 16, 16), 5.0, edge_voxels=2.0)
    assert mask[8, 8, 8] == 1.0 and mask[0, 0, 0] == 0.0
    assert float(mask.min()) >= 0.0 and float(mask.max()) <= 1.0


def test_frame_scores_do_not_depend_on_the_particles_orientation():
    volumes, _, maps = _easy_set(per_class=2, snr=1e6)
    refs = torch.stack(maps)
    quarter = torch.tensor([[0.0, -1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])  # 90 degrees about z: exact
    turned = transform_volumes(volumes, quarter.expand(len(volumes), 3, 3), torch.zeros(len(volumes), 3))
    a = frame_scores(volumes, 90.0, refs, OPTIONS).scores
    b = frame_scores(turned, 90.0, refs, OPTIONS).scores
    assert torch.allclose(a, b, atol=0.05), (a - b).abs().max()
    assert bool((a.argmax(1) == b.argmax(1)).all())


def test_mode_seeking_references_collect_one_structure_each():
    volumes, truth, _ = _easy_set()
    ids = np.arange(len(truth))
    seeds = choose_seeds(invariant_features(volumes, 60.0), ids, 4, seed=0)
    assert len(set(seeds.tolist())) == 4 and set(seeds.tolist()) <= set(ids.tolist())
    refs = gather_volumes(volumes, ids, seeds)
    scores = frame_scores(volumes, 60.0, refs, OPTIONS, reference_tilt_range_degrees=60.0)
    updated = update_references(volumes, 60.0, scores, OPTIONS, refs)
    rescored = frame_scores(volumes, 60.0, updated, OPTIONS).scores
    centred = rescored - rescored.mean(dim=1, keepdim=True)
    for j in range(updated.shape[0]):
        top = torch.topk(centred[:, j], OPTIONS.members_per_reference).indices.numpy()
        assert len(set(truth[top].tolist())) == 1, (j, truth[top])


def test_frame_embedding_clusters_an_easy_set():
    from jimray.cluster.gmm import GaussianMixture

    volumes, truth, _ = _easy_set(per_class=10, snr=1.0)
    ids = np.arange(len(truth))
    embedding, frame = frame_step(volumes, np.full(len(ids), 60.0), ids, 16, OPTIONS, LocalReducer(), None)
    gmm = GaussianMixture(2, covariance_type="diag", reg_covar=1e-3, n_init=3, random_state=0).fit(embedding)
    assert clustering_accuracy(truth, np.asarray(gmm.predict(embedding))) >= 0.95
    restored = FrameRound.from_state(frame.get_state())
    assert torch.allclose(restored.embed(volumes, 60.0), embedding, atol=1e-5)


def _worker(rank, world, init_file, out_dir, volumes, split):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        part = slice(0, split) if rank == 0 else slice(split, len(volumes))
        ids = np.arange(len(volumes))[part]
        reducer = TorchDistributedReducer()
        first, frame = frame_step(volumes[part], np.full(len(ids), 60.0), ids, 16, OPTIONS, reducer, None)
        second, frame2 = frame_step(volumes[part], np.full(len(ids), 60.0), ids, 16, OPTIONS, reducer, frame)
        torch.save({"ids": ids, "first": first, "second": second, "refs": frame2.next_references},
                   os.path.join(out_dir, f"frame{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_distributed_frame_step_equals_single_process(tmp_path):
    volumes, _, _ = _easy_set(per_class=6, snr=1.0)
    ids = np.arange(len(volumes))
    first, frame = frame_step(volumes, np.full(len(ids), 60.0), ids, 16, OPTIONS, LocalReducer(), None)
    second, frame2 = frame_step(volumes, np.full(len(ids), 60.0), ids, 16, OPTIONS, LocalReducer(), frame)
    torch.multiprocessing.spawn(_worker, args=(2, str(tmp_path / "rdzv"), str(tmp_path), volumes, 5), nprocs=2)
    parts = [torch.load(tmp_path / f"frame{r}.pt", weights_only=False) for r in range(2)]
    assert torch.allclose(torch.cat([p["first"] for p in parts]), first, atol=1e-5)
    assert torch.allclose(torch.cat([p["second"] for p in parts]), second, atol=1e-4)
    scale = float(frame2.next_references.abs().max())  # sums of float32 volumes: compare relative to their size
    assert torch.allclose(parts[0]["refs"], frame2.next_references, atol=1e-6 * scale)
    assert torch.equal(parts[0]["refs"], parts[1]["refs"])


def test_bench_compare_names_an_unknown_structure_without_a_traceback(tmp_path):
    from typer.testing import CliRunner

    from jimray.cli.app import app
    from jimray.cli.errors import UserError

    result = CliRunner().invoke(app, ["bench", "compare", "--snrs", "0.1", "--structures", "nosuch",
                                      "--per-class", "2", "--pairs", "1", "--out", str(tmp_path)])
    assert isinstance(result.exception, UserError)  # run_app prints it as one line, exit code 2
    assert "nosuch" in str(result.exception) and "choose from" in str(result.exception)


def test_pseudo_molecules_are_seeded_distinct_maps_in_the_box():
    from jimray.simulate.pseudo import pseudo_molecules

    first, again = pseudo_molecules(3, box_size=16, seed=1), pseudo_molecules(3, box_size=16, seed=1)
    assert list(first) == ["pseudo_1_0", "pseudo_1_1", "pseudo_1_2"]
    maps = list(first.values())
    assert all(m.shape == (16, 16, 16) and bool(torch.isfinite(m).all()) for m in maps)
    assert all(torch.equal(a, b) for a, b in zip(maps, again.values(), strict=True))
    assert not torch.allclose(maps[0], maps[1])
