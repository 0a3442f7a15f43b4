"""``train_loop_per_worker``: Algorithm 1 (pair-matching rounds) inside one Ray Train run.

Workers stay warm across rounds. Each round: embed the shard (the common frame, :mod:`jimray.train.frame_step`,
or Jim-Net's F(x, x), ``frame.embedding``) -> distributed PCA + GMM -> labels matched
to last round's -> sampler actor filled -> training epochs on same-cluster pairs -> one checkpoint and
one ``ray.train.report`` per round. A restarted worker (or a rerun of the same job) resumes from the
last round's checkpoint (``ray.train.get_checkpoint()``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from torch.distributed.algorithms.join import Join

from jimray.cluster import labels as matching
from jimray.cluster.reduce import LocalReducer, TorchDistributedReducer
from jimray.config import JobConfig
from jimray.model.jimnet import JimNet
from jimray.train import rounds
from jimray.train.clustering import ClusterState, cluster_embeddings
from jimray.train.frame_step import FrameRound, frame_k_chooser, frame_step
from jimray.train.pretrain import load_pretrained_weights
from jimray.train.state import RoundState, load_pretrained, load_round_state, save_round_state
from jimray.train.step import pair_step

# Test hook, read by the driver from the environment: "round=R,rank=K,marker=/path" makes worker K die once
# in the middle of round R (the marker file records that it happened and stops it happening again).
FAULT_ENV = "JIMRAY_FAULT_INJECT"


class _Context:
    """Per-worker handles: config, device, rank, reducer, sampler actor, dataset shard."""

    def __init__(self, config: JobConfig, sampler_name: str):
        self.config = config
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        distributed = dist.is_available() and dist.is_initialized()
        self.reducer = TorchDistributedReducer() if distributed else LocalReducer()
        self.sampler = ray.get_actor(sampler_name)
        self.shard = ray.train.get_dataset_shard("train")
        self.batch_size = config.train.batch_size

    def batches(self):
        return self.shard.iter_batches(batch_size=self.batch_size, batch_format="numpy")

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def _maybe_inject_fault(spec: str | None, round_index: int, rank: int) -> None:
    if not spec:
        return
    fields = dict(item.split("=", 1) for item in spec.split(","))
    marker = Path(fields["marker"])
    if int(fields["round"]) == round_index and int(fields["rank"]) == rank and not marker.exists():
        marker.write_text(f"worker rank {rank} killed during round {round_index}\n")
        os._exit(1)


def _build(config: JobConfig, n_clusters: int, device, state: RoundState | None):
    model = JimNet(config.model, n_clusters)
    if state is not None:
        model.resize_head(state.n_clusters)
        model.load_state_dict(state.model_state)
    elif config.train.init_from:
        load_pretrained_weights(model, load_pretrained(config.train.init_from))
    model.to(device)
    return model


def _optimizer(model: torch.nn.Module, config: JobConfig) -> torch.optim.Optimizer:
    return torch.optim.Adam(model.parameters(), lr=config.train.lr, weight_decay=config.train.weight_decay)


def _previous_labels(ctx: _Context, ids: np.ndarray, first_round: bool) -> np.ndarray | None:
    if first_round:
        return None
    return np.asarray(ray.get(ctx.sampler.labels_of.remote(ids)), dtype=np.int64)


def _fill_sampler(ctx: _Context, local: rounds.LocalEmbeddings, labels: np.ndarray, round_index: int) -> None:
    if ctx.rank == 0:
        ray.get(ctx.sampler.reset_round.remote(round_index))
    ctx.barrier()
    order = np.argsort(local.ids)
    res_labels = labels[order][np.searchsorted(local.ids[order], local.reservoir_ids)]
    ray.get(ctx.sampler.add_labels.remote(local.ids, labels))
    ray.get(
        ctx.sampler.offer_targets.remote(
            local.reservoir_ids, res_labels, local.reservoir_volumes, tilts=local.reservoir_tilts
        )
    )
    ctx.barrier()


def _train_pass(ctx: _Context, ddp_model, optimizer, lowpass: float) -> dict[str, float]:
    """(d) One epoch over the shard: each source gets a same-cluster target from the sampler."""
    cfg = ctx.config.train
    sums: dict[str, float] = {}
    steps, pairs = 0, 0
    ddp_model.train()
    # Shards may differ by a row (every subtomogram is used): Join shadows the all-reduces of finished ranks.
    with Join([ddp_model]) if ctx.world > 1 else contextlib.nullcontext():
        for batch in ctx.batches():
            ids = np.asarray(batch["id"], dtype=np.int64)
            source_np = np.ascontiguousarray(batch["volume"], dtype=np.float32)
            source_tilts = np.asarray(batch["tilt_range_degrees"], dtype=np.float32)
            labels, target_ids, target_volumes, target_tilts = (
                np.array(a) for a in ray.get(ctx.sampler.sample_target_batch.remote(ids))
            )
            alone = target_ids < 0  # a cluster without reservoir members: pair the source with itself
            target_volumes[alone], target_tilts[alone] = source_np[alone], source_tilts[alone]
            source = torch.from_numpy(source_np).to(ctx.device)
            target = torch.from_numpy(target_volumes).to(ctx.device)
            terms = pair_step(  # train.precision: fp32, tf32 or bf16 autocast (jimray.precision)
                ddp_model,
                optimizer,
                source,
                target,
                torch.as_tensor(source_tilts, device=ctx.device),
                torch.as_tensor(target_tilts, dtype=torch.float32, device=ctx.device),
                torch.as_tensor(labels, dtype=torch.long, device=ctx.device),
                cfg.gamma,
                cfg.lambda_reg,
                lowpass,
                cfg.precision,
            )
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + float(value)
            steps += 1
            pairs += len(ids)
    keys = sorted(sums)
    reduced = ctx.reducer.all_reduce_sum(
        torch.tensor([sums[k] for k in keys] + [float(pairs), float(steps)], dtype=torch.float64))
    total_steps = max(float(reduced[-1]), 1.0)
    return {f"loss_{k}": float(reduced[i]) / total_steps for i, k in enumerate(keys)} | {
        "steps": int(total_steps), "pairs": int(reduced[-2])}


def _round_metrics(ctx, local, labels, cluster: ClusterState, changed: float, losses: dict, seconds: float) -> dict:
    metrics = {
        "n_clusters": cluster.n_clusters,
        "cluster_sizes": rounds.global_cluster_sizes(labels, cluster.n_clusters, ctx.reducer),
        "fraction_changed": changed,
        "bic": cluster.bic,
        "n_subtomograms": int(ctx.reducer.all_reduce_sum(torch.tensor([float(len(labels))])).item()),
        "seconds": seconds,
        **losses,
    }
    has_truth = matching.global_max(0.0 if local.truth is None else 1.0, ctx.reducer) > 0
    if has_truth:
        truth = local.truth if local.truth is not None else np.zeros(0, np.int64)
        metrics["clustering_accuracy"] = matching.global_accuracy(truth, labels, cluster.n_clusters, ctx.reducer)
    return metrics


def _gather_labels(ctx: _Context, ids: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if ctx.world == 1:
        return ids, labels
    parts: list = [None] * ctx.world
    dist.all_gather_object(parts, (ids, labels))
    all_ids = np.concatenate([p[0] for p in parts])
    all_labels = np.concatenate([p[1] for p in parts])
    order = np.argsort(all_ids)
    return all_ids[order], all_labels[order]


def _report(ctx, model, optimizer, cluster: ClusterState, history, ids, labels, round_index: int,
            frame: FrameRound | None) -> None:
    all_ids, all_labels = _gather_labels(ctx, ids, labels)
    metrics = dict(history[-1])
    if ctx.rank != 0:
        ray.train.report(metrics)
        return
    state = RoundState(
        round_index=round_index,
        n_clusters=cluster.n_clusters,
        model_state={k: v.detach().cpu() for k, v in model.state_dict().items()},
        optimizer_state=optimizer.state_dict(),
        gmm_state=cluster.gmm_state,
        pca_state=cluster.pca_state,
        history=history,
        ids=all_ids,
        labels=all_labels,
        config=ctx.config.model_dump(mode="json"),
        frame_state=None if frame is None else frame.get_state(),
    )
    with tempfile.TemporaryDirectory() as tmp:
        save_round_state(tmp, state)
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _restore(ctx: _Context) -> RoundState | None:
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        state = load_round_state(directory)
    if ctx.rank == 0 and state.ids is not None:
        ray.get(ctx.sampler.reset_round.remote(state.round_index))
        ray.get(ctx.sampler.add_labels.remote(state.ids, state.labels))
    ctx.barrier()
    if ctx.rank == 0:
        print(f"[jimray] resuming after round {state.round_index} from the last checkpoint", flush=True)
    return state


def _log_round(ctx: _Context, metrics: dict) -> None:
    if ctx.rank != 0:
        return
    acc = metrics.get("clustering_accuracy")
    acc_text = f" accuracy {100 * acc:.1f}%" if acc is not None else ""
    print(
        f"[jimray] round {metrics['round']}/{ctx.config.train.rounds}: K={metrics['n_clusters']} "
        f"sizes={metrics['cluster_sizes']} changed={metrics['fraction_changed']:.3f} "
        f"loss={metrics.get('loss_total', float('nan')):.4f}{acc_text} ({metrics['seconds']:.1f} s)",
        flush=True,
    )


def train_loop_per_worker(loop_config: dict) -> None:
    """Ray Train entry point. ``loop_config``: ``{"job": JobConfig dict, "sampler": actor name, "fault": spec}``."""
    config = JobConfig.model_validate(loop_config["job"])
    ctx = _Context(config, loop_config["sampler"])
    torch.manual_seed(config.train.seed)
    state = _restore(ctx)
    start = 0 if state is None else state.round_index
    history = [] if state is None else list(state.history)
    k0 = config.gmm.n_components or (state.n_clusters if state else max(config.gmm.candidates))
    model = _build(config, k0, ctx.device, state)
    optimizer = _optimizer(model, config)
    if state is not None and state.optimizer_state is not None:
        optimizer.load_state_dict(state.optimizer_state)
    cluster_prev = None if state is None else ClusterState.from_checkpoint(state)
    frame = None if state is None or state.frame_state is None else FrameRound.from_state(state.frame_state)
    for round_index in range(start + 1, config.train.rounds + 1):
        optimizer, cluster, local, frame, metrics = _run_round(ctx, model, optimizer, cluster_prev, frame,
                                                               round_index, loop_config.get("fault"))
        history.append(metrics)
        _log_round(ctx, metrics)
        cluster_prev = cluster
        _report(ctx, model, optimizer, cluster, history, local.ids, cluster.labels, round_index, frame)
    if start >= config.train.rounds and history:
        ray.train.report(dict(history[-1]))


def _embed(ctx: _Context, model: JimNet, frame_prev: FrameRound | None, round_index: int):
    """(a): the local embeddings (Jim-Net's ``F(x, x)`` or the common frame's) and the round's frame state."""
    config = ctx.config
    frame_mode = config.frame.embedding == "frame"
    local = rounds.embed_shard(None if frame_mode else model, ctx.batches(), ctx.device,
                               _reservoir_capacity(config, ctx.world), config.train.seed + round_index)
    if not frame_mode:
        return local, None
    local.embeddings, frame = frame_step(local.volumes, local.tilts, local.ids, config.data.box_size,
                                         config.frame.options(config.train.seed), ctx.reducer, frame_prev)
    return local, frame


def _k_chooser(ctx: _Context, local: rounds.LocalEmbeddings, frame: FrameRound | None):
    """K by held-out class averages (``gmm.k_selection: distinct``) when K is chosen and the frame embeds."""
    gmm = ctx.config.gmm
    if frame is None or gmm.n_components is not None or gmm.k_selection != "distinct" or not gmm.consensus_dims:
        return None
    return frame_k_chooser(local.volumes, local.tilts, local.ids, frame, gmm.candidates, ctx.reducer, gmm.seed,
                           gmm.distinct_lowpass_cycles_per_voxel, gmm.distinct_scoring)


def _run_round(ctx: _Context, model: JimNet, optimizer, cluster_prev: ClusterState | None,
               frame_prev: FrameRound | None, round_index: int, fault: str | None):
    """(a)-(d) of one round; returns the (possibly new) optimiser, the matched clustering, the local
    embeddings, the frame state (None with the network embedding) and the round's metrics (with timings)."""
    config = ctx.config
    clock = [time.perf_counter()]

    def lap() -> float:
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    local, frame = _embed(ctx, model, frame_prev, round_index)
    seconds = {"seconds_embed": lap()}
    previous = _previous_labels(ctx, local.ids, first_round=cluster_prev is None)
    prev_k = None if cluster_prev is None else cluster_prev.n_clusters
    cluster = cluster_embeddings(local.embeddings, config.gmm, ctx.reducer, previous, prev_k,
                                 _k_chooser(ctx, local, frame), ids=local.ids)
    local.volumes = None
    if frame is not None:
        frame.scores = None
    labels, changed, lut = matching.relabel_to_previous(cluster.labels, previous, cluster.n_clusters, ctx.reducer)
    matching.reorder_to(cluster.gmm, lut)
    cluster = cluster.with_labels(labels)
    _fill_sampler(ctx, local, labels, round_index)
    seconds["seconds_cluster"] = lap()
    if model.n_clusters != cluster.n_clusters:
        model.resize_head(cluster.n_clusters)
        model.to(ctx.device)
        optimizer = _optimizer(model, config)
    ddp_model = ray.train.torch.prepare_model(model, move_to_device=False) if ctx.world > 1 else model
    _maybe_inject_fault(fault, round_index, ctx.rank)
    losses: dict = {}
    pairs = 0  # pairs trained on over all epochs and ranks
    for _ in range(config.train.epochs_per_round):
        losses = _train_pass(ctx, ddp_model, optimizer, config.model.lowpass_cycles_per_voxel)
        pairs += losses.pop("pairs")
    seconds["seconds_train"] = lap()
    seconds["pairs_per_second"] = pairs / max(seconds["seconds_train"], 1e-9)
    metrics = _round_metrics(ctx, local, labels, cluster, changed, losses, clock[-1] - clock[0])
    return optimizer, cluster, local, frame, {"round": round_index, **metrics, **seconds}


def _reservoir_capacity(config: JobConfig, world_size: int) -> int:
    k_max = config.gmm.n_components or max(config.gmm.candidates)
    return int(np.ceil(config.train.reservoir_per_cluster * k_max / max(world_size, 1)))
