"""``jimray bench scaling``: training throughput with 1, 2, 4, ... Ray Train workers on a ``ray.cluster_utils.Cluster``
of simulated nodes (or a real cluster, ``--address``), and where each round's time goes.

For each worker count the same short ``jimray train`` job runs (same data, same K, same seed). Per round
``metrics.csv`` gives the seconds of the embed pass (reading the shard + the frame or network embedding), of the
clustering (distributed PCA + GMM + K + label matching + sampler fill) and of the training epochs (DDP forward /
backward with its gradient all-reduce inside). A probe run per worker count (a Ray Train job with the same data
and split, but no model) times what the rounds cannot separate: reading one pass of the shard (first batch and
whole pass, no compute) and one all-reduce of a gradient-sized float32 tensor over gloo. Scaling efficiency of a
step is ``throughput(n) / ((n / n0) * throughput(n0))`` with ``n0`` the smallest worker count (1 by default).
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from jimray.bench.common import TINY_TRAINING, markdown_table, split_list, write_results

STEPS = ("embed", "cluster", "train", "round")
ROUND_COLUMNS = ["workers", "round", "subtomograms", "embed_per_s", "pairs_per_s", "seconds_embed",
                 "seconds_cluster", "seconds_train", "seconds_round", "eff_embed", "eff_cluster", "eff_train",
                 "eff_round"]
TOTAL_COLUMNS = ["workers", "cpus_per_worker", "worker_nodes", "embed_per_s", "pairs_per_s", "seconds_read_first",
                 "seconds_read_pass", "seconds_embed", "seconds_cluster", "seconds_train", "allreduce_ms",
                 "seconds_allreduce_est", "seconds_rounds", "seconds_job", "eff_embed", "eff_cluster", "eff_train",
                 "eff_round"]


@dataclass(frozen=True)
class Settings:
    """One scaling study: worker counts, cluster shape (CPUs per simulated node) and the job's size."""

    workers: tuple[int, ...] = (1, 2, 4)
    nodes: int = 2
    cpus_per_node: float = 1.0
    object_store_mib: int = 150
    per_class: int = 34
    box: int = 32
    snr: float = 0.1
    rounds: int = 2
    epochs: int = 1
    k: int = 6
    tiny: bool = False
    probe: bool = True
    data: Path | None = None
    address: str | None = None
    extra: tuple[str, ...] = field(default_factory=tuple)


def parse_workers(text: str) -> tuple[int, ...]:
    """``"1,2,4"`` -> ``(1, 2, 4)`` (sorted, unique, each >= 1)."""
    try:
        counts = sorted({int(part) for part in split_list(text)})
    except ValueError:
        raise typer.BadParameter(f"expected worker counts like 1,2,4, got {text!r}") from None
    if not counts or counts[0] < 1:
        raise typer.BadParameter(f"worker counts must be >= 1, got {text!r}")
    return tuple(counts)


def worker_cpus(workers: int, node_cpus: list[float]) -> float:
    """Ray CPUs per training worker (fractional): one whole CPU stays free for Ray Data's read tasks (each asks
    for 1 CPU), so the workers get ``total - 1`` CPUs, capped so that they fit on all nodes but one (Ray Train packs
    them; one node: on ``cpus - 1``). Floored at 0.05 CPU."""
    total = sum(node_cpus)
    usable = node_cpus[:-1] if len(node_cpus) > 1 else [node_cpus[0] - 1.0]
    per_node = math.ceil(workers / len(usable))
    cap = min(usable) / per_node
    return max(0.05, round(min((total - 1.0) / workers, cap), 3))


@contextmanager
def connected_cluster(s: Settings):
    """Ray for the study: a ``ray.cluster_utils.Cluster`` of ``s.nodes`` simulated nodes with ``s.cpus_per_node``
    CPUs and ``s.object_store_mib`` MiB of object store each (all on this machine, sharing its cores), or the real
    cluster at ``s.address``. Yields the node names by node id (``head``, ``node1``, ...)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if ray.is_initialized():
        ray.shutdown()
    if s.address:
        ray.init(address=s.address, log_to_driver=False)
        try:
            yield {n["NodeID"]: f"node{i}" for i, n in enumerate(ray.nodes()) if n["Alive"]}
        finally:
            ray.shutdown()
        return
    cluster = _start_cluster(s)
    try:
        ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        names = {cluster.head_node.node_id: "head"}
        names |= {node.node_id: f"node{i + 1}" for i, node in enumerate(cluster.worker_nodes)}
        yield names
    finally:
        ray.shutdown()
        cluster.shutdown()


def _start_cluster(s: Settings):
    from ray.cluster_utils import Cluster

    store = s.object_store_mib * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": s.cpus_per_node, "object_store_memory": store, "include_dashboard": False})
    for _ in range(s.nodes - 1):
        cluster.add_node(num_cpus=s.cpus_per_node, object_store_memory=store)
    cluster.wait_for_nodes()
    return cluster


def node_cpus() -> list[float]:
    """CPUs of each live node of the connected cluster, head (the driver's node) first."""
    import ray

    here = ray.get_runtime_context().get_node_id()
    nodes = [n for n in ray.nodes() if n["Alive"]]
    nodes.sort(key=lambda n: n["NodeID"] != here)
    return [float(n["Resources"].get("CPU", 0.0)) for n in nodes]


def simulate_data(out: Path, s: Settings) -> Path:
    """The six embedded structures x ``s.per_class`` at ``s.snr``, box ``s.box`` (320 A field of view), as
    Parquet shards under ``out``; returns the shard folder."""
    from jimray.io.simulated import simulate_dataset, write_simulated_dataset

    voxel = 320.0 / s.box
    sim, names = simulate_dataset(None, s.per_class, s.snr, s.box, voxel, 60.0, seed=7)
    write_simulated_dataset(out, sim, voxel, 60.0, names)
    return out / "shards"


def job_config(s: Settings, data: Path, out: Path, workers: int, cpus: float):
    """The study's job: defaults (frame embedding), K = ``s.k`` given, ``--tiny`` model, ``s.extra`` last."""
    from jimray.config import load_job

    overrides = [*(TINY_TRAINING if s.tiny else ()), f"data.path={data}", f"data.box_size={s.box}",
                 f"gmm.n_components={s.k}", f"train.rounds={s.rounds}", f"train.epochs_per_round={s.epochs}",
                 f"scaling.num_workers={workers}", f"scaling.cpus_per_worker={cpus}", "scaling.max_failures=0",
                 f"output.dir={out}", *s.extra]
    return load_job(None, overrides)


class PlacementWatch:
    """Polls Ray's placement groups (every 0.5 s, in a thread) and records the nodes of the groups with
    ``bundles`` bundles (the Ray Train workers' group)."""

    def __init__(self, bundles: int, names: dict[str, str]):
        self.bundles, self.names, self.seen = bundles, names, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _poll(self) -> None:
        import ray

        while not self._stop.wait(0.5):
            try:
                table = ray.util.placement_group_table()
            except Exception:  # noqa: BLE001 -- placement is informative only
                continue
            for pg_id, pg in table.items():
                nodes = pg.get("bundles_to_node_id") or {}
                if len(pg.get("bundles", {})) == self.bundles and len(nodes) == self.bundles:
                    self.seen[pg_id] = [self.names.get(nodes[b], nodes[b][:8]) for b in sorted(nodes)]

    def describe(self) -> str:
        """``head x2 + node1 x1`` for the last group seen; ``?`` if none was."""
        if not self.seen:
            return "?"
        last = list(self.seen.values())[-1]
        return " + ".join(f"{name} x{last.count(name)}" for name in sorted(set(last)))


def run_job(s: Settings, data: Path, out: Path, workers: int, cpus: float, names: dict) -> dict:
    """One training run; its per-round metrics (``metrics.csv`` rows), wall seconds and worker placement."""
    import pandas as pd

    from jimray.run_files import METRICS_CSV
    from jimray.train.driver import run_training

    config = job_config(s, data, out, workers, cpus)
    start = time.perf_counter()
    with PlacementWatch(workers, names) as watch:
        run_training(config, command=["jimray", "bench", "scaling"])
    seconds = time.perf_counter() - start
    return {"rounds": pd.read_csv(out / METRICS_CSV).to_dict("records"), "seconds_job": seconds,
            "worker_nodes": watch.describe(), "batch_size": config.train.batch_size}


def job_facts(s: Settings, data: Path) -> dict:
    """The job's embedding (``frame`` / ``network``) and the trainable parameters of its Jim-Net
    (``gradient_numel``: the float32 values of DDP's gradient all-reduce per step)."""
    from jimray.model.jimnet import JimNet

    config = job_config(s, data, Path(tempfile.gettempdir()), 1, 1.0)
    numel = sum(p.numel() for p in JimNet(config.model, s.k).parameters() if p.requires_grad)
    return {"embedding": config.frame.embedding, "gradient_numel": numel}


def _probe_loop(loop_config: dict) -> None:
    """Ray Train worker of the probe: one pass over the shard (no compute), then ``repeats`` all-reduces of a
    float32 tensor of ``numel`` elements; reports the maxima over ranks (seconds)."""
    import ray.train
    import torch
    import torch.distributed as dist

    shard = ray.train.get_dataset_shard("train")
    start, first, rows = time.perf_counter(), float("nan"), 0
    for batch in shard.iter_batches(batch_size=loop_config["batch_size"], batch_format="numpy"):
        first = time.perf_counter() - start if rows == 0 else first
        rows += len(batch["id"])
    stats = torch.tensor([first, time.perf_counter() - start, float("nan")], dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        stats[2] = _time_all_reduce(loop_config["numel"], loop_config["repeats"])
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    metrics = {"seconds_read_first": float(stats[0]), "seconds_read_pass": float(stats[1]),
               "allreduce_ms": 1000.0 * float(stats[2])}
    with tempfile.TemporaryDirectory() as tmp:  # Ray Train V2 keeps the metrics of checkpointed reports only
        rank0 = ray.train.get_context().get_world_rank() == 0
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank0 else None)


def _time_all_reduce(numel: int, repeats: int) -> float:
    """Mean seconds of one ``all_reduce_sum`` of ``numel`` float32 values (after one warm-up)."""
    import torch

    from jimray.cluster.reduce import TorchDistributedReducer

    reducer, grad = TorchDistributedReducer(), torch.ones(numel, dtype=torch.float32)
    reducer.all_reduce_sum(grad)
    start = time.perf_counter()
    for _ in range(repeats):
        reducer.all_reduce_sum(grad)
    return (time.perf_counter() - start) / repeats


def run_probe(s: Settings, data: Path, out: Path, workers: int, cpus: float, batch_size: int, numel: int) -> dict:
    """The probe job (:func:`_probe_loop`) on the training job's data and split: read and all-reduce seconds."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from jimray.train.driver import EveryRowDataConfig, build_dataset

    config = job_config(s, data, out, workers, cpus)
    trainer = TorchTrainer(
        _probe_loop, train_loop_config={"batch_size": batch_size, "numel": numel, "repeats": 10},
        scaling_config=ScalingConfig(num_workers=workers, resources_per_worker={"CPU": cpus}),
        run_config=RunConfig(name="probe", storage_path=str(out)), torch_config=TorchConfig(backend="gloo"),
        datasets={"train": build_dataset(config, data)}, dataset_config=EveryRowDataConfig())
    return dict(trainer.fit().metrics)


def round_rows(s: Settings, workers: int, job: dict) -> list[dict]:
    """Per-round rows: subtomograms/s of the embed pass, pairs/s of the training epochs (every subtomogram is
    the source of one pair per epoch) and the seconds of each step."""
    rows = []
    for r in job["rounds"]:
        n = int(r["n_subtomograms"])
        rows.append({"workers": workers, "round": int(r["round"]), "subtomograms": n,
                     "seconds_embed": float(r["seconds_embed"]), "seconds_cluster": float(r["seconds_cluster"]),
                     "seconds_train": float(r["seconds_train"]), "seconds_round": float(r["seconds"]),
                     "embed_per_s": n / float(r["seconds_embed"]),
                     "pairs_per_s": n * s.epochs / float(r["seconds_train"])})
    return rows


def total_row(s: Settings, workers: int, cpus: float, job: dict, rows: list[dict], probe: dict) -> dict:
    """All rounds of one worker count together, with the probe's read and all-reduce seconds; the estimated
    all-reduce seconds of DDP = all-reduce time x steps per worker x epochs x rounds (an upper bound: DDP
    overlaps its bucketed all-reduces with the backward pass)."""
    n = sum(r["subtomograms"] for r in rows)
    sec = {k: sum(r[f"seconds_{k}"] for r in rows) for k in STEPS}
    steps = math.ceil(n / len(rows) / workers / job["batch_size"]) * s.epochs * len(rows)
    allreduce_ms = probe.get("allreduce_ms", float("nan")) if workers > 1 else float("nan")
    return {"workers": workers, "cpus_per_worker": cpus, "worker_nodes": job["worker_nodes"], "subtomograms": n,
            **{f"seconds_{k}": v for k, v in sec.items() if k != "round"}, "seconds_rounds": sec["round"],
            "seconds_job": job["seconds_job"], "embed_per_s": n / sec["embed"],
            "pairs_per_s": n * s.epochs / sec["train"],
            "seconds_read_first": probe.get("seconds_read_first", float("nan")),
            "seconds_read_pass": probe.get("seconds_read_pass", float("nan")), "allreduce_ms": allreduce_ms,
            "seconds_allreduce_est": allreduce_ms * steps / 1000.0 if workers > 1 else 0.0}


def add_efficiency(rows: list[dict], seconds_key: dict[str, str]) -> None:
    """``eff_<step>`` = t(n0) * n0 / (t(n) * n), the same as throughput(n) / ((n / n0) * throughput(n0)), with
    ``n0`` the smallest worker count among rows of the same round (key ``round``, if any)."""
    base: dict = {}
    for r in sorted(rows, key=lambda r: r["workers"]):
        base.setdefault(r.get("round"), r)
    for r in rows:
        b = base[r.get("round")]
        for step, key in seconds_key.items():
            r[f"eff_{step}"] = b[key] * b["workers"] / (r[key] * r["workers"]) if r[key] > 0 else float("nan")


def study(s: Settings, log=print) -> dict:
    """Run the study: connect (or simulate) the cluster, simulate (or take) the data, one training job and one
    probe per worker count. Returns ``{"settings", "cluster", "rounds", "totals"}``."""
    load = _load()
    with tempfile.TemporaryDirectory(prefix="jimray-bench-scaling-") as tmp, connected_cluster(s) as names:
        data = s.data or simulate_data(Path(tmp) / "data", s)
        cpus_by_node = node_cpus()
        facts = job_facts(s, data)
        numel = facts["gradient_numel"]
        per_round, totals = [], []
        for workers in s.workers:
            cpus = worker_cpus(workers, cpus_by_node)
            log(f"[scaling] {workers} worker(s) at {cpus} CPU each")
            job = run_job(s, data, Path(tmp) / f"run{workers}", workers, cpus, names)
            probe = (run_probe(s, data, Path(tmp) / f"probe{workers}", workers, cpus, job["batch_size"], numel)
                     if s.probe else {})
            rows = round_rows(s, workers, job)
            per_round += rows
            totals.append(total_row(s, workers, cpus, job, rows, probe))
    steps = {k: f"seconds_{k}" for k in STEPS}
    add_efficiency(per_round, steps)
    add_efficiency(totals, steps | {"round": "seconds_rounds"})
    cluster = {"nodes": len(cpus_by_node), "cpus_by_node": cpus_by_node, "simulated": not s.address,
               **facts, "cores": os.cpu_count(), "load_start": load, "load_end": _load()}
    return {"settings": _settings_record(s), "cluster": cluster, "rounds": per_round, "totals": totals}


def _load() -> float:
    """This machine's 1-minute load average (runnable processes; NaN where unknown)."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return float("nan")


def _settings_record(s: Settings) -> dict:
    record = {k: getattr(s, k) for k in s.__dataclass_fields__}
    record["data"] = None if s.data is None else str(s.data)
    return record


def notes(results: dict) -> str:
    """The table notes: what ran where, and an honest word where workers outnumber the cores."""
    s, c = results["settings"], results["cluster"]
    where = (f"{c['nodes']} simulated Ray nodes (`ray.cluster_utils.Cluster`, {c['cpus_by_node']} CPUs, "
             f"{s['object_store_mib']} MiB object store each) on one machine with {c['cores']} cores"
             if c["simulated"] else f"a real Ray cluster of {c['nodes']} nodes ({c['cpus_by_node']} CPUs)")
    data = s["data"] or f"six embedded structures x {s['per_class']}, SNR {s['snr']:g}, box {s['box']}"
    lines = [f"Ran on {where}. Data: {data}; K = {s['k']} given, {s['rounds']} rounds x {s['epochs']} epoch(s), "
             f"{c.get('embedding', 'frame')} embedding{', tiny model' if s['tiny'] else ''}; gradient all-reduce of "
             f"{c['gradient_numel']} float32 values per step. Load average (1 min) at the start "
             f"{c.get('load_start', float('nan')):.1f}, at the end {c.get('load_end', float('nan')):.1f}."]
    over = [w for w in s["workers"] if c["cores"] and w > c["cores"]]
    if over:
        lines.append(f"**Workers outnumber the machine's {c['cores']} cores for n = {', '.join(map(str, over))}: "
                     "these rows cannot scale** (the processes time-share the same cores); neither can any count "
                     "beyond the cores the simulated nodes share.")
    return "\n".join(lines) + "\n"


def markdown(results: dict) -> str:
    """Totals table (per worker count), per-round table and notes."""
    md = "### Training scaling: all rounds per worker count\n\n" + markdown_table(results["totals"], TOTAL_COLUMNS)
    md += "\n### Per round\n\n" + markdown_table(results["rounds"], ROUND_COLUMNS)
    return md + "\n" + notes(results) + LEGEND


LEGEND = (
    "Columns: embed_per_s = subtomograms / seconds_embed (reading the shard + the embedding); pairs_per_s = "
    "subtomograms x epochs / seconds_train (all workers); seconds_cluster = distributed PCA + GMM + K + label "
    "matching + sampler fill; seconds_read_first / seconds_read_pass = the probe's time to the first batch / to "
    "read one pass of the shard without compute (slowest worker; every round reads 1 + epochs passes, overlapped "
    "with compute); allreduce_ms = one gloo all-reduce of the gradient (probe), seconds_allreduce_est = that x steps "
    "per worker (inside seconds_train; an upper bound, DDP overlaps it with backward); seconds_job = the whole "
    "`run_training` call (Ray Train start, checkpoints); eff_<step> = throughput(n) / ((n / n0) x throughput(n0)), "
    "n0 = the smallest worker count.\n")


def bench_scaling(
    workers: Annotated[str, typer.Option(help="worker counts, comma-separated")] = "1,2,4",
    nodes: Annotated[int, typer.Option(min=1, help="simulated Ray nodes (head + nodes - 1)")] = 2,
    cpus_per_node: Annotated[float, typer.Option(min=1.0, help="Ray CPUs of each simulated node")] = 1.0,
    object_store_mib: Annotated[int, typer.Option(min=50, help="object store of each simulated node, MiB")] = 150,
    per_class: Annotated[int, typer.Option(min=1, help="simulated subtomograms per structure (6 structures)")] = 34,
    box: Annotated[int, typer.Option(min=8, help="box edge, voxels")] = 32,
    rounds: Annotated[int, typer.Option(min=1, help="pair-matching rounds per run")] = 2,
    epochs: Annotated[int, typer.Option(min=1, help="epochs per round")] = 1,
    k: Annotated[int, typer.Option(min=1, help="clusters (given, not chosen)")] = 6,
    tiny: Annotated[bool, typer.Option(help="the tests' tiny Jim-Net and GMM (CI-sized runs)")] = False,
    probe: Annotated[bool, typer.Option(help="time a read pass and the gradient all-reduce per worker count")] = True,
    data: Annotated[Path | None, typer.Option(help="Parquet shards / STAR / MRC folder instead of simulating")] = None,
    address: Annotated[str | None, typer.Option(help="a running Ray cluster instead of simulated nodes")] = None,
    set_: Annotated[list[str], typer.Option("--set", help="extra job overrides key=value")] = [],  # noqa: B006
    out: Annotated[Path, typer.Option(help="where scaling.json and scaling.md go")] = Path("benchmarks"),
) -> None:
    """Training throughput and where the time goes with 1, 2, 4 Ray Train workers on simulated nodes."""
    s = Settings(workers=parse_workers(workers), nodes=nodes, cpus_per_node=cpus_per_node,
                 object_store_mib=object_store_mib, per_class=per_class, box=box, rounds=rounds, epochs=epochs,
                 k=k, tiny=tiny, probe=probe, data=data, address=address or os.environ.get("RAY_ADDRESS"),
                 extra=tuple(set_))
    results = study(s, log=typer.echo)
    md = markdown(results)
    write_results(out, "scaling", results, md, "jimray bench scaling " + " ".join(sys.argv[3:]))
    typer.echo(md)


def register(bench_app: typer.Typer) -> None:
    bench_app.command("scaling")(bench_scaling)
