"""A real peer in the speed and accuracy race (issue 15): pytme beside our classical search and Jim-Net.

* ``jimray bench compare``: three registered methods (:func:`~jimray.bench.methods.register_method`) built on
  :mod:`jimray.baselines.pytme_peer`, at the run's ``--angular-step``: ``pytme (no wedge filter)``, ``pytme
  (target wedge on template)`` (the same pairs as the constrained-CC search) and ``pytme (true map as reference,
  target wedge)``, its intended use: every paired particle searched with the true, wedge-free map of its class
  (an oracle reference, like the true-pose ceiling), pair poses composed from the two particle poses (so its
  seconds per pair cover two searches). They are
  opt-in (``CompareOptions.pytme``, set when ``--methods`` names ``pytme``): one thread, no reuse across pairs,
  a few seconds per pair at 30 degrees and about six times that at 15.
* ``jimray bench compare-speed``: :func:`pytme_speed_rows` (the same pairs and particles as the search rows,
  per step, with and without the wedge filter) and :func:`jimnet_speed_row` (Jim-Net's single pass on the same
  pairs), and :func:`ratio_note`, the issue's ratio: Jim-Net's single pass against the fastest classical row that
  reaches its rotation error.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from jimray.baselines import pytme_peer
from jimray.bench.methods import CompareOptions, Dataset, MethodResult, register_method
from jimray.conventions import rotation_error

PAIR_NAMES = {"none": "pytme (no wedge filter)", "target": "pytme (target wedge on template)"}
REFERENCE_NAME = "pytme (true map as reference, target wedge)"
WEDGE_LABELS = {"none": "no wedge filter", "target": "target wedge on template"}
JIMNET_NAME = "Jim-Net single pass"
THREAD_NOTE = ("pytme {version}: numpyfftw backend (pyFFTW, 1 thread), 1 job, FLCSphericalMask score, Gaussian "
               "low-pass at 0.25 cycles/voxel, its own rotation set, no local refinement, one pair at a time: "
               "one CPU thread.")


def _pytme_options(options: CompareOptions, wedge_filter: str) -> pytme_peer.PytmeOptions:
    return pytme_peer.PytmeOptions(angular_step_degrees=options.angular_step_degrees, wedge_filter=wedge_filter)


def pytme_pairs_method(wedge_filter: str) -> Callable[[CompareOptions], Callable[[Dataset], MethodResult] | None]:
    """Factory of factories: pytme on every pair (source = template) with ``wedge_filter``; None (no row) unless
    ``options.pytme``."""

    def factory(options: CompareOptions):
        if not options.pytme:
            return None
        pytme_peer.require_pytme()
        opts = _pytme_options(options, wedge_filter)

        def run(ds: Dataset) -> MethodResult:
            res = pytme_peer.align_pairs_pytme(ds.volumes[ds.pairs[:, 0]], ds.volumes[ds.pairs[:, 1]],
                                               ds.tilt_range_degrees, opts)
            return MethodResult(pair_rotations=res.rotations, pair_shifts=res.shifts, extra=_extra(opts))

        return run

    return factory


def pytme_reference_method(options: CompareOptions) -> Callable[[Dataset], MethodResult] | None:
    """pytme's intended use: each paired particle against its class's true map (wedge-free), target wedge on the
    rotated map; pair poses ``(R_t R_s^T, ...)`` composed from the particle poses. None unless ``options.pytme``."""
    if not options.pytme:
        return None
    pytme_peer.require_pytme()
    opts = _pytme_options(options, "target")

    def run(ds: Dataset) -> MethodResult:
        from jimray.bench.compare import compare_maps, pair_truth

        maps = torch.stack(compare_maps(options)).float()
        used = np.unique(ds.pairs)
        res = pytme_peer.align_to_reference_pytme(ds.volumes[used], maps[ds.classes[used]], ds.tilt_range_degrees,
                                                  opts)
        rotations = torch.eye(3).repeat(len(ds.classes), 1, 1)
        shifts = torch.zeros(len(ds.classes), 3)
        rotations[used], shifts[used] = res.rotations, res.shifts
        pair_r, pair_t = pair_truth(rotations, shifts, ds.pairs)
        return MethodResult(pair_rotations=pair_r, pair_shifts=pair_t, extra=_extra(opts))

    return run


def _extra(opts: pytme_peer.PytmeOptions) -> dict:
    return {"pytme_rotations": pytme_peer.rotation_count(opts.angular_step_degrees), "threads": 1}


def register_pytme_methods() -> None:
    """Add the pytme rows to ``jimray bench compare`` (they run only with ``CompareOptions.pytme``)."""
    for wedge_filter, name in PAIR_NAMES.items():
        register_method(name, pytme_pairs_method(wedge_filter))
    register_method(REFERENCE_NAME, pytme_reference_method)


def pytme_speed_rows(ds: Dataset, reference: torch.Tensor, steps: tuple[float, ...], wedges: tuple[str, ...],
                     snr: float) -> list[dict]:
    """compare-speed rows of pytme: per step and wedge filter, wall (and CPU) seconds per pair (``ds``'s pairs,
    source as template) and wall seconds per particle against the wedge-free ``reference (d, h, w)``
    (``ds.volumes[:n]``, n = pairs; no reuse across particles), with their mean rotation errors; after one
    untimed warm-up search (pyFFTW plans)."""
    n = len(ds.pairs)
    src, tgt, parts = ds.volumes[ds.pairs[:, 0]], ds.volumes[ds.pairs[:, 1]], ds.volumes[:n]
    pytme_peer.match_one(src[0].numpy(), tgt[0].numpy(), 60.0, np.eye(3)[None], pytme_peer.PytmeOptions())
    rows = []
    for step in steps:
        for wedge in wedges:
            opts = pytme_peer.PytmeOptions(angular_step_degrees=step, wedge_filter=wedge)
            start, cpu = time.perf_counter(), time.process_time()
            pair = pytme_peer.align_pairs_pytme(src, tgt, ds.tilt_range_degrees, opts)
            middle, cpu = time.perf_counter(), time.process_time() - cpu
            ref = pytme_peer.align_to_reference_pytme(parts, reference, ds.tilt_range_degrees, opts)
            end = time.perf_counter()
            rows.append({
                "method": f"pytme {pytme_peer.PYTME_VERSION} ({WEDGE_LABELS[wedge]})", "box": int(ds.volumes.shape[-1]),
                "snr": snr, "angular_step_degrees": step, "rotations": pytme_peer.rotation_count(step),
                "refine_rotations": 0, "n": n, "seconds_per_pair": (middle - start) / n,
                "seconds_per_particle_shared_reference": (end - middle) / n, "cpu_seconds_per_pair": cpu / n,
                "pair_rotation_error_mean": float(rotation_error(ds.pair_rotations, pair.rotations).mean()),
                "reference_rotation_error_mean": float(rotation_error(ds.rotations[:n], ref.rotations).mean()),
                "threads": 1,
            })
    return rows


def load_jimnet(model_path: str | None):
    """``(model, trained)``: the ``jimray pretrain`` model at ``model_path`` (``pretrained.pt`` or its folder), or
    an untrained Jim-Net of the default size (``ModelConfig()``, seed 0) when None: its time, not its error."""
    from jimray.config import ModelConfig
    from jimray.model import JimNet

    if model_path is None:
        torch.manual_seed(0)
        return JimNet(ModelConfig(), 2), False
    from jimray.train.pretrain import load_pretrained_weights
    from jimray.train.state import load_pretrained

    pretrained = load_pretrained(model_path)
    model = JimNet(ModelConfig(**pretrained.model_config), 2)
    load_pretrained_weights(model, pretrained)
    return model, True


def jimnet_speed_row(ds: Dataset, model_path: str | None, snr: float, repeats: int = 3) -> dict:
    """Jim-Net's single pass on ``ds``'s pairs (:func:`jimray.bench.jimnet_method.align_pairs_jimnet`, volumes
    normalised as in training): inference seconds per pair (median of ``repeats`` passes after a warm-up, torch's
    threads) and the mean rotation error (NaN for an untrained network)."""
    from jimray.bench.jimnet_method import align_pairs_jimnet, normalised

    model, trained = load_jimnet(model_path)
    volumes = normalised(ds.volumes)
    src, tgt = volumes[ds.pairs[:, 0]], volumes[ds.pairs[:, 1]]
    align_pairs_jimnet(model, src[:1], tgt[:1])
    seconds, cpu = [], []
    for _ in range(repeats):
        start, cpu_start = time.perf_counter(), time.process_time()
        rotations, _ = align_pairs_jimnet(model, src, tgt)
        seconds.append(time.perf_counter() - start)
        cpu.append(time.process_time() - cpu_start)
    error = float(rotation_error(ds.pair_rotations, rotations).mean()) if trained else float("nan")
    name = JIMNET_NAME + ("" if trained else " (untrained: time only)")
    return {"method": name, "box": int(ds.volumes.shape[-1]), "snr": snr, "n": len(ds.pairs),
            "seconds_per_pair": float(np.median(seconds)) / len(ds.pairs),
            "cpu_seconds_per_pair": float(np.median(cpu)) / len(ds.pairs), "pair_rotation_error_mean": error,
            "torch_threads": torch.get_num_threads()}


def ratio_note(rows: list[dict]) -> str:
    """The issue's ratio: seconds per pair of the fastest classical row (search or pytme) whose pair rotation
    error is at most Jim-Net's single pass's, over Jim-Net's (goal >= 100); one line (empty without Jim-Net)."""
    jimnet = next((r for r in rows if r["method"].startswith(JIMNET_NAME)), None)
    if jimnet is None:
        return ""
    classical = [r for r in rows if not r["method"].startswith(JIMNET_NAME)]
    err = jimnet["pair_rotation_error_mean"]
    if err != err:  # untrained network: no error to match
        fastest = min(classical, key=lambda r: r["seconds_per_pair"])
        return (f"Ratio (goal >= 100 at equal rotation error): not established, Jim-Net untrained (give "
                f"--jimnet-model); against the fastest classical row overall ({fastest['method']}, "
                f"{fastest['angular_step_degrees']:g} deg) its single pass is {_speedup(fastest, jimnet)}.\n\n")
    good = [r for r in classical if r["pair_rotation_error_mean"] <= err]
    if not good:
        return f"Ratio: no classical row reaches Jim-Net's pair rotation error {err:.3g}; Jim-Net is ahead.\n\n"
    fastest = min(good, key=lambda r: r["seconds_per_pair"])
    return (f"Ratio (goal >= 100): the fastest classical row at pair rotation error <= {err:.3g} is "
            f"{fastest['method']} at {fastest['angular_step_degrees']:g} deg ({fastest['seconds_per_pair']:.3g} "
            f"s/pair); Jim-Net's single pass is {_speedup(fastest, jimnet)}.\n\n")


def _speedup(classical: dict, jimnet: dict) -> str:
    """How many times faster Jim-Net is: in wall time, and in CPU time where both rows have it."""
    text = f"{classical['seconds_per_pair'] / jimnet['seconds_per_pair']:.3g}x faster"
    if classical.get("cpu_seconds_per_pair") and jimnet.get("cpu_seconds_per_pair"):
        text += f" (CPU time: {classical['cpu_seconds_per_pair'] / jimnet['cpu_seconds_per_pair']:.3g}x)"
    return text


register_pytme_methods()
