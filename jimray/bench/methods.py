"""The records of ``jimray bench compare`` and its method registry, in one small module that the runner
(:mod:`jimray.bench.compare`) and the method modules (e.g. :mod:`jimray.bench.jimnet_method`) both import, so
that neither imports the other's internals.

A method is a callable ``method(dataset) -> MethodResult``, built by a factory ``factory(options)`` (or None when
the options leave the method out). The runner's own methods are listed explicitly in
:func:`jimray.bench.compare.build_methods`; :func:`register_method` adds more (plugins, tests) after them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

__all__ = ["PAPER_SNRS", "CompareOptions", "Dataset", "Method", "MethodFactory", "MethodResult", "registered_methods",
           "register_method"]

PAPER_SNRS = (100.0, 0.1, 0.05, 0.03, 0.01)


@dataclass
class Dataset:
    """One simulated level: ``volumes (n, d, h, w)``, true ``classes (n,)``, poses ``rotations (n, 3, 3)`` /
    ``shifts (n, 3)`` (particle ~ transform(map, R, t)), ``pairs (m, 2)`` (source, target) indices of
    same-class subtomograms with true pair poses ``pair_rotations (m, 3, 3)`` / ``pair_shifts (m, 3)``."""

    volumes: torch.Tensor
    classes: np.ndarray
    rotations: torch.Tensor
    shifts: torch.Tensor
    tilt_range_degrees: float
    snr: float
    n_classes: int
    pairs: np.ndarray
    pair_rotations: torch.Tensor
    pair_shifts: torch.Tensor
    asymmetric: np.ndarray | None = None  # (n_classes,) bool: the class's structure has point group C1


@dataclass
class MethodResult:
    """What a method predicts: ``labels (n,)`` (or None) and/or the pose of each pair of the data set,
    ``pair_rotations (m, 3, 3)`` / ``pair_shifts (m, 3)`` with target ~ transform(source, R, t) (or None)."""

    labels: np.ndarray | None = None
    pair_rotations: torch.Tensor | None = None
    pair_shifts: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class CompareOptions:
    snrs: tuple[float, ...] = PAPER_SNRS
    structures: tuple[str, ...] = ("6zu5_ribosome", "4v8r_tric")
    per_class: int = 10
    pairs: int = 10
    tilt_range_degrees: float = 60.0
    box_size: int = 32
    angular_step_degrees: float = 30.0
    refine_steps: int = 4
    mra_iterations: int = 3
    pca_components: int = 10
    frame_rounds: int = 5  # common frame (jimray): mode-seeking rounds
    seed: int = 0
    jimnet_rounds: int = 3  # Jim-Net (measured, jimray.bench.jimnet_method): training rounds per level
    jimnet_epochs: int = 2  # epochs per round
    jimnet_job: str | None = None  # job YAML ('{snr}' = the level) instead of the jobs/snr_*.yaml defaults
    jimnet_overrides: tuple[str, ...] = ()  # extra --set strings for the Jim-Net job
    jimnet_init: str | None = None  # a `jimray pretrain` model: adds the "Jim-Net (measured, pretrained)" rows
    pytme: bool = False  # the pytme peer rows (jimray.bench.peer; slow, opt-in: `--methods pytme`)


Method = Callable[[Dataset], MethodResult]
MethodFactory = Callable[[CompareOptions], Method | None]

_REGISTERED: dict[str, MethodFactory] = {}


def register_method(name: str, factory: MethodFactory) -> None:
    """Add a method: ``factory(options)`` returns ``method(dataset) -> MethodResult``, or None when the options
    leave the method out. Registered methods run after the runner's own, in registration order."""
    _REGISTERED[name] = factory


def registered_methods() -> dict[str, MethodFactory]:
    """The methods added by :func:`register_method` (name -> factory), in registration order."""
    return dict(_REGISTERED)
