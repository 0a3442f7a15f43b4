"""End-to-end training on a local 2-CPU Ray cluster: 2 DDP workers (gloo), distributed GMM, sampler actor,
checkpoints per round, resume after a killed worker (equal to an uninterrupted run), and resume of a finished run;
and single rounds (``_run_round``) run in this process, where K grows between rounds or a cluster is left empty."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import starfile
import torch
from conftest import TINY_TRAINING

from jimray.cluster import labels as matching
from jimray.cluster.reduce import LocalReducer
from jimray.config import load_job
from jimray.conventions import clustering_accuracy
from jimray.data.reader import normalize_batch
from jimray.io.simulated import simulate_dataset, write_simulated_dataset

pytestmark = pytest.mark.ray

TINY = [
    *TINY_TRAINING,
    "gmm.candidates=[2, 3, 4]",
    "data.box_size=16",
    "scaling.num_workers=2",
    "scaling.cpus_per_worker=0.5",
]


N_TINY = 13  # subtomograms of the tiny set (ids 0..12)
ROUNDS = 3  # of the uninterrupted run, and of the run whose worker is killed in round 2


def _tiny_set():
    sim, names = simulate_dataset(None, per_class=4, snr=float("inf"), box=16, voxel_size_angstrom=20.0,
                                  tilt_range_degrees=60.0, seed=1)
    keep = (sim.classes < 3) | (torch.arange(len(sim)) == int(torch.nonzero(sim.classes == 3)[0]))
    # three structures and one stray: 13 subtomograms, odd, so an equal split between 2 workers would drop one
    sim = type(sim)(**{k: getattr(sim, k)[keep] for k in ("volumes", "classes", "rotations", "shifts",
                                                          "euler_degrees")})
    assert len(sim) == N_TINY
    return sim, names


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tinydata")
    sim, names = _tiny_set()
    write_simulated_dataset(out, sim, 20.0, 60.0, names, rows_per_shard=5)
    return out / "shards"


def _run(tiny_data, out, rounds: int, extra=()):
    from jimray.train.driver import run_training

    config = load_job(None, [*TINY, f"data.path={tiny_data}", f"output.dir={out}", f"train.rounds={rounds}", *extra])
    return run_training(config, command=["pytest"])


def _run_seeing_sampler(monkeypatch, tiny_data, out, rounds: int, extra=()) -> tuple[dict, dict]:
    """:func:`_run`, plus the sampler actor's state at the end of the run: its round and the label of every id,
    read when the driver kills it (``run_training``'s ``finally``)."""
    import jimray.train.driver as driver

    ray = driver.ray
    seen: dict = {}
    kill = ray.kill

    def read_then_kill(actor, *args, **kwargs):
        if getattr(actor, "labels_of", None) is not None:  # the sampler (Ray Train may kill actors of its own)
            seen["round"] = ray.get(actor.current_round.remote(), timeout=60)
            seen["labels"] = ray.get(actor.labels_of.remote(np.arange(N_TINY)), timeout=60).tolist()
        return kill(actor, *args, **kwargs)

    monkeypatch.setattr(ray, "kill", read_then_kill)
    try:
        summary = _run(tiny_data, out, rounds, extra)
    finally:
        monkeypatch.setattr(ray, "kill", kill)
    assert seen, "the driver never killed its sampler actor"
    return summary, seen


@pytest.fixture(scope="module")
def uninterrupted_run(ray_cluster, tiny_data, tmp_path_factory):
    """One uninterrupted run of ROUNDS rounds on the tiny set: (run directory, summary, sampler state at the end)."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    with pytest.MonkeyPatch.context() as monkeypatch:
        summary, sampler = _run_seeing_sampler(monkeypatch, tiny_data, out, rounds=ROUNDS)
    return out, summary, sampler


def _labels_by_id(run_dir) -> dict[int, int]:
    with np.load(run_dir / "model" / "labels.npz") as saved:
        return dict(zip(saved["ids"].tolist(), saved["labels"].tolist(), strict=True))


def test_training_writes_run_dir(tiny_data, uninterrupted_run):
    out, summary, sampler = uninterrupted_run
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["round"]) == list(range(1, ROUNDS + 1))
    assert {"loss_total", "loss_ce", "loss_align_1", "loss_align_2", "fraction_changed", "bic",
            "clustering_accuracy", "n_clusters"} <= set(metrics.columns)
    assert (metrics["n_subtomograms"] == 13).all()  # every id embedded exactly once per round
    assert summary["rounds_completed"] == ROUNDS
    assert sum(summary["cluster_sizes"]) == 13
    with np.load(out / "model" / "labels.npz") as saved:  # every subtomogram labelled once, keyed by id
        ids, labels = saved["ids"], saved["labels"]
    assert np.array_equal(np.sort(ids), np.arange(13))
    # the reported accuracy is the paper's metric of the saved last-round labels against the shards' truth
    truth = pd.read_parquet(tiny_data, columns=["id", "true_class"]).set_index("id")["true_class"]
    assert summary["clustering_accuracy"] == pytest.approx(clustering_accuracy(truth.loc[ids].to_numpy(), labels))
    assert summary["cluster_sizes"] == np.bincount(labels, minlength=summary["n_clusters"]).tolist()
    assert json.loads((out / "summary.json").read_text()) == summary
    assert metrics["clustering_accuracy"].iloc[-1] == pytest.approx(summary["clustering_accuracy"])
    saved_job = load_job(out / "config.yaml")
    assert saved_job.data.path == str(tiny_data) and saved_job.train.rounds == ROUNDS
    assert [run["command"] for run in json.loads((out / "run.json").read_text())] == ["pytest"]
    for name in ("metrics.png", "model/state.pt"):
        assert (out / name).stat().st_size > 0, name
    # the sampler ends on the last round, holding the saved labels of every id
    assert sampler["round"] == ROUNDS
    assert sampler["labels"] == [_labels_by_id(out)[i] for i in range(N_TINY)]


def _assert_same_run(run, reference, sampler, reference_sampler) -> None:
    """``run`` ended where the uninterrupted ``reference`` did: the same saved labels (by id), the same K, cluster
    sizes and label changes in every round, the same clustering rule and common frame in the final checkpoint,
    and a sampler on the last round with the same label for every id. (Losses may differ: Ray Data hands the
    batches to the workers in its own order.)"""
    from jimray.train.state import load_round_state

    assert _labels_by_id(run) == _labels_by_id(reference)
    metrics, expected = pd.read_csv(run / "metrics.csv"), pd.read_csv(reference / "metrics.csv")
    for column in ("round", "n_clusters", "cluster_sizes", "fraction_changed", "n_subtomograms"):
        assert metrics[column].tolist() == expected[column].tolist(), column
    for column in ("bic", "clustering_accuracy"):
        assert metrics[column].tolist() == pytest.approx(expected[column].tolist(), rel=1e-6), column
    state, expected_state = load_round_state(run / "model"), load_round_state(reference / "model")
    assert (state.round_index, state.n_clusters) == (expected_state.round_index, expected_state.n_clusters)
    for part, key in (("frame_state", "references"), ("frame_state", "next_references"), ("gmm_state", "means")):
        got, want = getattr(state, part)[key], getattr(expected_state, part)[key]
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * float(want.abs().max())), (part, key)
    assert sampler == reference_sampler


def test_killed_worker_resumes_and_rerun_resumes(tiny_data, uninterrupted_run, tmp_path, monkeypatch):
    """A worker killed in round 2 of 3: Ray Train restarts the workers from the round-1 checkpoint, and the run
    ends exactly where the uninterrupted run of the same job does; rerunning the finished job trains nothing."""
    from jimray.train.loop import FAULT_ENV

    reference, _, reference_sampler = uninterrupted_run
    out = tmp_path / "run"
    marker = tmp_path / "killed.txt"
    monkeypatch.setenv(FAULT_ENV, f"round=2,rank=1,marker={marker}")
    _, sampler = _run_seeing_sampler(monkeypatch, tiny_data, out, rounds=ROUNDS, extra=["scaling.max_failures=1"])
    assert marker.is_file(), "the fault was never injected"
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["round"]) == [1, 2, 3]  # nothing lost, nothing repeated
    _assert_same_run(out, reference, sampler, reference_sampler)
    monkeypatch.delenv(FAULT_ENV)
    summary, sampler = _run_seeing_sampler(monkeypatch, tiny_data, out, rounds=ROUNDS)  # resumes, trains nothing
    assert summary["rounds_completed"] == 3
    assert len(json.loads((out / "run.json").read_text())) == 2
    assert list(pd.read_csv(out / "metrics.csv")["round"]) == [1, 2, 3]
    _assert_same_run(out, reference, sampler, reference_sampler)


def test_training_starts_from_a_pretrained_model(ray_cluster, tiny_data, tmp_path):
    """train.init_from loads the pretrained alignment branch into every worker (a vanishing learning rate keeps
    the weights where they started, so the run's model must equal the pretrained one but for the cluster head)."""
    from jimray.train.pretrain_job import run_pretraining
    from jimray.train.state import load_pretrained, load_round_state

    pre = tmp_path / "pre"
    run_pretraining(load_job(None, [*TINY, "pretrain.curriculum=[[30, 2]]", "pretrain.batch_size=2",
                                    "pretrain.eval_pairs=2", "pretrain.eval_every=2",
                                    "pretrain.structures=[6zu5_ribosome]"]), pre)  # fmt: skip
    out = tmp_path / "run"
    _run(tiny_data, out, rounds=1, extra=[f"train.init_from={pre}", "train.lr=1e-30", "gmm.n_components=3"])
    trained = load_round_state(out / "model").model_state
    pretrained = load_pretrained(pre).model_state
    for key, value in pretrained.items():
        if not key.startswith("cluster_head."):
            assert torch.allclose(trained[key], value, atol=1e-6), key


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory):
    """Two very different structures (a ribosome and a small membrane protein) at high SNR, 12 each."""
    out = tmp_path_factory.mktemp("easydata")
    sim, names = simulate_dataset(None, per_class=12, snr=10.0, box=16, voxel_size_angstrom=20.0,
                                  tilt_range_degrees=60.0, seed=2)
    keep = (sim.classes == 0) | (sim.classes == 3)  # 6zu5_ribosome and 6msm_cftr
    sim = type(sim)(**{k: getattr(sim, k)[keep] for k in ("volumes", "classes", "rotations", "shifts",
                                                          "euler_degrees")})
    write_simulated_dataset(out, sim, 20.0, 60.0, names, rows_per_shard=7)
    return out / "shards"


def test_easy_training_finds_both_structures_and_predict_reproduces_them(ray_cluster, easy_data, tmp_path):
    from jimray.predict.pipeline import predict

    out = tmp_path / "run"
    summary = _run(easy_data, out, rounds=2, extra=["gmm.n_components=2", "gmm.covariance_type=diag"])
    assert summary["clustering_accuracy"] >= 0.9, summary  # chance is 0.5
    pred = predict(out, easy_data, tmp_path / "pred", actors=1, batch_size=8, iterations=1, average=False)
    assert "common frame" in pred.rule
    star = starfile.read(tmp_path / "pred" / "particles.star", always_dict=True)["particles"]
    ids = [int(str(name).rsplit("_", 1)[1].split(".")[0]) for name in star["rlnImageName"]]
    with np.load(out / "model" / "labels.npz") as saved:
        final = dict(zip(saved["ids"].tolist(), saved["labels"].tolist(), strict=True))
    agree = np.mean([final[i] == label - 1 for i, label in zip(ids, star["rlnClassNumber"], strict=True)])
    assert agree >= 0.99, agree


def test_easy_training_chooses_the_number_of_structures(ray_cluster, easy_data, tmp_path):
    """K unset: two workers choose it by held-out class averages (gmm.k_selection: distinct, the default)."""
    out = tmp_path / "run"
    summary = _run(easy_data, out, rounds=2, extra=["gmm.n_components=null", "gmm.candidates=[2, 3, 4]"])
    assert summary["n_clusters"] == 2, summary
    assert summary["clustering_accuracy"] >= 0.9, summary
    metrics = pd.read_csv(out / "metrics.csv")
    assert metrics["n_clusters"].tolist() == [2, 2]


# ---------------------------------------------------------------------- single rounds in this process
@pytest.fixture(scope="module")
def tiny_rows() -> dict[str, np.ndarray]:
    """The tiny set as Ray Data hands it to a worker: numpy columns, each volume normalised."""
    sim, _ = _tiny_set()
    return normalize_batch({"id": np.arange(N_TINY, dtype=np.int64), "volume": sim.volumes.numpy(),
                            "tilt_range_degrees": np.full(N_TINY, 60.0, np.float32),
                            "true_class": sim.classes.numpy().astype(np.int64)})  # fmt: skip


class _OneWorker:
    """What ``jimray.train.loop._run_round`` asks of its worker context, in this process: rank 0 of 1 (a
    LocalReducer), the rows in numpy batches, a real sampler actor, and a config that may change between rounds."""

    rank, world, device = 0, 1, torch.device("cpu")

    def __init__(self, rows: dict[str, np.ndarray]):
        from jimray.train.sampler import PairSamplerActor

        self.rows, self.reducer = rows, LocalReducer()
        self.configure()
        self.sampler = PairSamplerActor.options(num_cpus=0).remote(self.config.train.reservoir_per_cluster,
                                                                   self.config.train.seed)  # fmt: skip

    def configure(self, *overrides: str) -> None:
        self.config = load_job(None, [*TINY, *overrides])
        self.batch_size = self.config.train.batch_size

    def batches(self):
        for lo in range(0, N_TINY, self.batch_size):
            yield {key: column[lo : lo + self.batch_size] for key, column in self.rows.items()}

    def barrier(self) -> None:
        """One worker: nothing to wait for (the real context's barrier is a no-op at world size 1 too)."""

    def sampler_state(self) -> tuple[int, np.ndarray]:
        import ray

        ids = np.arange(N_TINY)
        return ray.get(self.sampler.current_round.remote()), ray.get(self.sampler.labels_of.remote(ids))

    def close(self) -> None:
        import ray

        ray.kill(self.sampler)


def _rounds(worker: _OneWorker, settings: list[list[str]]):
    """``_run_round`` for rounds 1, 2, ... with the config overrides ``settings[r - 1]`` in round ``r`` (a fresh tiny
    Jim-Net, seeded); yields ``(round, model, optimizer, cluster, local, metrics)`` after each round."""
    from jimray.train import loop

    torch.manual_seed(0)
    worker.configure(*settings[0])
    gmm = worker.config.gmm
    model = loop._build(worker.config, gmm.n_components or max(gmm.candidates), worker.device, None)
    optimizer = loop._optimizer(model, worker.config)
    cluster, frame = None, None
    for r, overrides in enumerate(settings, start=1):
        worker.configure(*overrides)
        optimizer, cluster, local, frame, metrics = loop._run_round(worker, model, optimizer, cluster, frame, r, None)
        assert np.array_equal(local.ids, worker.rows["id"])
        yield r, model, optimizer, cluster, local, metrics


def _assert_round_is_whole(worker: _OneWorker, model, optimizer, cluster, local, metrics, k: int, r: int) -> None:
    """Labels in 0..K-1 for every id, the sampler on round ``r`` with the same labels and a same-cluster target
    for every id, K outputs of the head, an optimiser of the model's parameters, finite metrics and weights, and
    a mixture (what the checkpoint keeps) that predicts the round's labels under their matched names."""
    import ray

    labels = cluster.labels
    assert cluster.n_clusters == k and labels.shape == (N_TINY,) and 0 <= labels.min() and labels.max() < k
    assert metrics["n_clusters"] == k and metrics["n_subtomograms"] == N_TINY
    assert metrics["cluster_sizes"] == np.bincount(labels, minlength=k).tolist()
    assert sum(metrics["cluster_sizes"]) == N_TINY
    assert metrics["steps"] == -(-N_TINY // worker.batch_size)  # every batch trained
    assert all(np.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert model.n_clusters == k
    assert {id(p) for group in optimizer.param_groups for p in group["params"]} == {id(p) for p in model.parameters()}
    current, sampled = worker.sampler_state()
    assert current == r and np.array_equal(sampled, labels)
    source_labels, targets, _, _ = ray.get(worker.sampler.sample_target_batch.remote(np.arange(N_TINY)))
    assert np.array_equal(source_labels, labels)
    paired = targets >= 0
    assert np.array_equal(labels[targets[paired]], labels[paired])  # the targets share the source's cluster
    gmm = cluster.gmm
    for tensor in (gmm.weights_, gmm.means_, gmm.covariances_):
        assert bool(torch.isfinite(tensor).all())
    z = torch.as_tensor(cluster.pca.transform(local.embeddings.double()))
    assert np.array_equal(np.asarray(gmm.predict(z)), labels)


def _assert_names_kept(labels: np.ndarray, previous: np.ndarray, k: int, metrics: dict) -> None:
    """This round's names agree with last round's as well as any renaming of its clusters could (Hungarian)."""
    counts = matching.contingency(labels, previous, k, max(k, int(previous.max()) + 1))
    assert np.mean(labels == previous) == pytest.approx(matching.matched_fraction(counts))
    assert metrics["fraction_changed"] == pytest.approx(np.mean(labels != previous))


def test_a_round_that_grows_k_keeps_the_names_of_the_clusters_that_persist(ray_cluster, tiny_rows, monkeypatch):
    """Round 1 with K = 2, round 2 with K = 3 (whose fit names its clusters in reverse order: a mixture's
    component order is arbitrary): the two clusters that persist keep round 1's names (the Hungarian matching of
    round 2's clusters onto round 1's is the identity), the new one is called 2, the head grows to 3 outputs
    with a new optimiser, and the sampler serves round 2's labels."""
    from jimray.train import loop

    fit = loop.cluster_embeddings

    def names_reversed(*args, **kwargs):
        state = fit(*args, **kwargs)
        reverse = np.arange(state.n_clusters)[::-1].copy()
        matching.reorder_to(state.gmm, reverse)
        return state.with_labels(reverse[state.labels])

    monkeypatch.setattr(loop, "cluster_embeddings", names_reversed)
    worker = _OneWorker(tiny_rows)
    labels = {}
    try:
        for r, model, optimizer, cluster, local, metrics in _rounds(worker, [["gmm.n_components=2"],
                                                                             ["gmm.n_components=3"]]):  # fmt: skip
            _assert_round_is_whole(worker, model, optimizer, cluster, local, metrics, r + 1, r)
            assert min(metrics["cluster_sizes"]) > 0
            labels[r] = cluster.labels.copy()
            if r == 2:
                assert matching.match_counts(matching.contingency(labels[2], labels[1], 3, 2)) == {0: 0, 1: 1}
                _assert_names_kept(labels[2], labels[1], 3, metrics)
                assert 0 < metrics["fraction_changed"] < 0.5  # a cluster split in two, the other kept
    finally:
        worker.close()


def test_a_round_that_leaves_a_cluster_empty_and_the_next_round(ray_cluster, tiny_rows, monkeypatch):
    """Round 1's mixture predicts nobody into its component 1 (moved far from every embedding): size 0 is
    reported, the sampler and the training pass run on the two clusters left. Round 2 fits one mixture of K = 3
    (``gmm.consensus_dims=null``: the path that warm-starts from the means of last round's clusters, here with a
    cluster without members): no NaN, every id labelled, names matched to round 1's."""
    from jimray.train import loop

    fit = loop.cluster_embeddings
    previous_seen = []

    def component_1_left_empty(embeddings, config, reducer, previous_labels, previous_k, *args, **kwargs):
        previous_seen.append((previous_labels, previous_k))
        state = fit(embeddings, config, reducer, previous_labels, previous_k, *args, **kwargs)
        if previous_labels is None:  # round 1
            state.gmm.means_ = state.gmm.means_.clone()
            state.gmm.means_[1] += 1e3
            z = torch.as_tensor(state.pca.transform(embeddings.double()))
            state = state.with_labels(np.asarray(state.gmm.predict(z), dtype=np.int64))
        return state

    monkeypatch.setattr(loop, "cluster_embeddings", component_1_left_empty)
    worker = _OneWorker(tiny_rows)
    labels = {}
    try:
        settings = [["gmm.n_components=3"], ["gmm.n_components=3", "gmm.consensus_dims=null"]]
        for r, model, optimizer, cluster, local, metrics in _rounds(worker, settings):
            _assert_round_is_whole(worker, model, optimizer, cluster, local, metrics, 3, r)
            labels[r] = cluster.labels.copy()
            if r == 1:
                assert metrics["cluster_sizes"][1] == 0 and min(metrics["cluster_sizes"][::2]) > 0
            else:
                previous, previous_k = previous_seen[1]
                assert previous_k == 3 and np.array_equal(previous, labels[1])  # fitted knowing the empty cluster
                _assert_names_kept(labels[2], labels[1], 3, metrics)
    finally:
        worker.close()


def test_a_round_does_not_depend_on_the_order_of_the_rows(ray_cluster, tiny_rows):
    """Ray Data hands the rows to the workers in its own order and split: a round's K, labels (by id) and
    mixture must not depend on it (else a rerun, a resumed run or another number of workers labels otherwise)."""
    seen = []
    for order in (np.arange(N_TINY), np.random.default_rng(0).permutation(N_TINY)):
        worker = _OneWorker({key: column[order] for key, column in tiny_rows.items()})
        try:
            [(_, _, _, cluster, local, metrics)] = _rounds(worker, [["gmm.n_components=3"]])
        finally:
            worker.close()
        seen.append((metrics["n_clusters"], dict(zip(local.ids.tolist(), cluster.labels.tolist(), strict=True)),
                     metrics["bic"]))
    assert seen[1][:2] == seen[0][:2]
    assert seen[1][2] == pytest.approx(seen[0][2], rel=1e-9)
