"""``jimray bench sampler``: pair-sampler memory and throughput at 1e6-1e7 ids (plain class and Ray actor)."""

from __future__ import annotations

import gc
import os
import sys

import numpy as np
import typer
from rich.console import Console

from jimray.bench.common import markdown_table, timer, write_results
from jimray.train.sampler import PairSampler, PairSamplerActor

console = Console(stderr=True)


def _rss_bytes(field: str = "VmRSS") -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def _ids_labels(n: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.permutation(n).astype(np.int64) * 7 + 11  # unique, unordered, not 0..n-1
    return ids, rng.integers(0, k, n).astype(np.int32)


def bench_plain(n: int, k: int, batch: int, n_pairs: int) -> dict:
    """add_labels in batches, first lookup (sort), grouping, sample_pairs and labels_of throughput."""
    ids, labels = _ids_labels(n, k, 0)
    gc.collect()
    rss0 = _rss_bytes()
    s = PairSampler(512, seed=0)
    with timer() as t_add:
        for lo in range(0, n, batch):
            s.add_labels(ids[lo : lo + batch], labels[lo : lo + batch])
    with timer() as t_index:
        s.labels_of(ids[:1])  # consolidates: concatenate + sort
    with timer() as t_group:
        s.sample_pairs(1)  # builds the per-cluster grouping
    with timer() as t_pairs:
        done = 0
        while done < n_pairs:
            s.sample_pairs(min(1_000_000, n_pairs - done))
            done += min(1_000_000, n_pairs - done)
    probe = ids[np.random.default_rng(1).integers(0, n, 1_000_000)]
    with timer() as t_lookup:
        s.labels_of(probe)
    rss1 = _rss_bytes()
    return {"n_ids": n, "K": k, "path": "plain class", "add_labels_ids_per_s": n / t_add(),
            "index_s": t_index(), "group_s": t_group(), "pairs_per_s": n_pairs / t_pairs(),
            "labels_of_per_s": len(probe) / t_lookup(), "memory_bytes": s.memory_bytes(),
            "bytes_per_id": s.memory_bytes() / n, "rss_delta_mib": (rss1 - rss0) / 2**20}


def bench_actor(n: int, k: int, batch: int, pair_batch: int, n_pairs: int) -> dict:
    """The same calls through a Ray actor: add_labels batches from the driver, sample_pairs in batches."""
    import ray

    if not ray.is_initialized():
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ids, labels = _ids_labels(n, k, 0)
    actor = PairSamplerActor.options(num_cpus=0).remote(512, 0)
    ray.get(actor.reset_round.remote(0))
    with timer() as t_add:
        ray.get([actor.add_labels.remote(ids[lo : lo + batch], labels[lo : lo + batch])
                 for lo in range(0, n, batch)])
        ray.get(actor.labels_of.remote(ids[:1]))
    with timer() as t_pairs:
        refs = [actor.sample_pairs.remote(pair_batch) for _ in range(max(1, n_pairs // pair_batch))]
        got = sum(len(r[0]) for r in ray.get(refs))
    row = {"n_ids": n, "K": k, "path": f"Ray actor (batches {batch} ids / {pair_batch} pairs)",
           "add_labels_ids_per_s": n / t_add(), "pairs_per_s": got / t_pairs(),
           "memory_bytes": ray.get(actor.memory_bytes.remote())}
    row["bytes_per_id"] = row["memory_bytes"] / n
    ray.kill(actor)
    return row


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("sampler")
    def sampler(
        sizes: str = typer.Option("1000000,10000000", help="comma-separated numbers of ids"),
        components: int = typer.Option(20, help="clusters K"),
        batch: int = typer.Option(100_000, help="ids per add_labels call"),
        pairs: int = typer.Option(5_000_000, help="pairs drawn per size (plain class)"),
        actor: bool = typer.Option(True, help="also measure through a Ray actor (at the smallest size)"),
        actor_pair_batch: int = typer.Option(10_000, help="pairs per sample_pairs call through the actor"),
        out: str = typer.Option("benchmarks", help="folder for sampler.json and sampler.md"),
    ) -> None:
        """Pair-sampler memory (memory_bytes, RSS delta) and add_labels / sample_pairs throughput."""
        ns = [int(float(s)) for s in sizes.split(",") if s.strip()]
        rows = []
        for n in ns:
            console.print(f"[bold]sampler[/] plain class, {n} ids, K={components} ...")
            rows.append(bench_plain(n, components, batch, pairs))
            console.print(rows[-1])
        if actor:
            console.print(f"[bold]sampler[/] Ray actor, {min(ns)} ids ...")
            rows.append(bench_actor(min(ns), components, batch, actor_pair_batch, 1_000_000))
            console.print(rows[-1])
        cols = ["n_ids", "K", "path", "add_labels_ids_per_s", "index_s", "group_s", "pairs_per_s",
                "labels_of_per_s", "memory_bytes", "bytes_per_id", "rss_delta_mib"]
        md = ("`index_s`: first lookup after all add_labels (concatenate + sort); `group_s`: per-cluster index "
              "built on the first sample_pairs; RSS delta measured after the run (process-wide).\n\n"
              + markdown_table(rows, cols))
        command = "jimray bench sampler " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "jimray bench sampler"
        write_results(out, "sampler", {"rows": rows}, md, command)
        typer.echo(md)
