"""Reducers: how the distributed estimators (GMM, PCA, seeding) combine statistics across workers.

A :class:`Reducer` sums tensors over all ranks (``all_reduce_sum``), broadcasts rank 0's tensor
(``broadcast``) and gathers one bounded random subsample of the global data set (``gather_sample``).
:class:`LocalReducer` is the single-process identity; :class:`TorchDistributedReducer` uses the
default ``torch.distributed`` process group (gloo on CPU, NCCL on GPU) -- pure torch, no Ray, so the
same estimator code runs inside Ray Train workers, in ``torch.multiprocessing`` tests and alone.

Every collective returns the same bits on every rank, so estimators driven only by reduced
statistics keep bit-identical state on all ranks.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch


@runtime_checkable
class Reducer(Protocol):
    """Collectives needed by the distributed estimators."""

    @property
    def world_size(self) -> int: ...

    @property
    def rank(self) -> int: ...

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Element-wise sum of ``t`` over all ranks (a new tensor; ``t`` is not modified)."""
        ...

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``t`` on every rank (same shape and dtype everywhere)."""
        ...

    def gather_sample(self, x: torch.Tensor, n_max: int, generator: torch.Generator) -> torch.Tensor:
        """A uniform random subsample (without replacement) of at most ``n_max`` rows of the global
        data set (the concatenation of every rank's ``x``, in rank order); identical on all ranks.
        ``generator`` must be seeded identically on all ranks (it is advanced identically)."""
        ...


def _check_sample_args(x: torch.Tensor, n_max: int) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim < 1:
        raise ValueError(f"gather_sample expects a tensor with rows, got {type(x).__name__}")
    if n_max < 1:
        raise ValueError(f"gather_sample needs n_max >= 1, got {n_max}")


def _global_sample_indices(n_total: int, n_max: int, generator: torch.Generator) -> torch.Tensor:
    """Sorted global row indices of a uniform subsample of size min(n_total, n_max) (CPU, int64)."""
    if n_total <= n_max:
        return torch.arange(n_total)
    return torch.randperm(n_total, generator=generator)[:n_max].sort().values


class LocalReducer:
    """Single process: every collective is the identity."""

    world_size = 1
    rank = 0

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        return t.clone()

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        if src != 0:
            raise ValueError(f"LocalReducer has only rank 0, got src={src}")
        return t.clone()

    def gather_sample(self, x: torch.Tensor, n_max: int, generator: torch.Generator) -> torch.Tensor:
        _check_sample_args(x, n_max)
        idx = _global_sample_indices(x.shape[0], n_max, generator)
        return x[idx.to(x.device)]


class TorchDistributedReducer:
    """Collectives over the default ``torch.distributed`` process group (which must be initialised).

    Tensors may live anywhere: under NCCL (GPU training) a CPU tensor (the rounds' embeddings, counts and
    averages are on the CPU) is reduced on the worker's current CUDA device and comes back on the CPU.
    """

    def __init__(self, group=None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "TorchDistributedReducer needs an initialised torch.distributed process group: call "
                "torch.distributed.init_process_group (Ray Train does this in each worker), or use LocalReducer"
            )
        self._dist = dist
        self._group = group
        self._world_size = dist.get_world_size(group)
        self._rank = dist.get_rank(group)
        nccl = str(dist.get_backend(group)).lower() == "nccl"
        self._device = torch.device("cuda", torch.cuda.current_device()) if nccl else None

    def _on_comm_device(self, t: torch.Tensor) -> torch.Tensor:
        """A contiguous copy of ``t`` on the device the backend communicates from."""
        device = t.device if self._device is None else self._device
        return t.detach().to(device=device, copy=True).contiguous()

    @property
    def world_size(self) -> int:
        return self._world_size

    @property
    def rank(self) -> int:
        return self._rank

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        out = self._on_comm_device(t)
        self._dist.all_reduce(out, op=self._dist.ReduceOp.SUM, group=self._group)
        return out.to(t.device)

    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        out = self._on_comm_device(t)
        self._dist.broadcast(out, src=src, group=self._group)
        return out.to(t.device)

    def _all_gather_rows(self, x: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """Concatenate every rank's ``x`` (row counts ``counts``) in rank order; pads to equal size."""
        n_pad = max(counts)
        padded = torch.zeros((n_pad, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        padded = self._on_comm_device(padded)
        parts = [torch.empty_like(padded) for _ in range(self._world_size)]
        self._dist.all_gather(parts, padded, group=self._group)
        return torch.cat([p[:c] for p, c in zip(parts, counts, strict=True)]).to(x.device)

    def gather_sample(self, x: torch.Tensor, n_max: int, generator: torch.Generator) -> torch.Tensor:
        _check_sample_args(x, n_max)
        counts = self.all_gather_counts(x.shape[0], x.device)
        offsets = [0]
        for c in counts:
            offsets.append(offsets[-1] + c)
        idx = _global_sample_indices(offsets[-1], n_max, generator)
        lo, hi = offsets[self._rank], offsets[self._rank + 1]
        local = idx[(idx >= lo) & (idx < hi)] - lo
        sizes = [int(((idx >= offsets[r]) & (idx < offsets[r + 1])).sum()) for r in range(self._world_size)]
        return self._all_gather_rows(x[local.to(x.device)].contiguous(), sizes)

    def all_gather_counts(self, n: int, device: torch.device | str = "cpu") -> list[int]:
        """Every rank's ``n`` (e.g. its number of rows), in rank order."""
        mine = torch.zeros(self._world_size, dtype=torch.int64, device=device)
        mine[self._rank] = n
        return [int(v) for v in self.all_reduce_sum(mine).cpu()]


def as_reducer(reducer: Reducer | None) -> Reducer:
    """``reducer`` itself, or a :class:`LocalReducer` when None."""
    if reducer is None:
        return LocalReducer()
    for name in ("all_reduce_sum", "broadcast", "gather_sample"):
        if not callable(getattr(reducer, name, None)):
            raise TypeError(
                f"reducer {type(reducer).__name__} lacks {name}(); use LocalReducer or TorchDistributedReducer"
            )
    return reducer


def all_reduce_spectra(spectra: torch.Tensor, weights: torch.Tensor, reducer: Reducer
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum complex Fourier sums ``spectra`` and real ``weights`` (any shapes) over all ranks in one collective;
    returns them summed, with their shapes (complex128 / float64)."""
    spectra, weights = spectra.to(torch.complex128), weights.to(torch.float64)
    packed = reducer.all_reduce_sum(torch.cat([torch.view_as_real(spectra).reshape(-1), weights.reshape(-1)]))
    summed = torch.view_as_complex(packed[: spectra.numel() * 2].reshape(*spectra.shape, 2).contiguous())
    return summed, packed[spectra.numel() * 2 :].reshape(weights.shape)
