"""Starting (or joining) Ray for the commands that use it: ``train``, ``predict``, ``pick``, ``pipeline`` and the
benchmarks. Plain ``ray`` and ``ray.data`` only -- importing this does not import Ray Train."""

from __future__ import annotations

import os

import ray

__all__ = ["init_ray", "quiet_data_progress"]


def init_ray(log_to_driver: bool = True) -> None:
    """Connect to the cluster named by ``RAY_ADDRESS`` (``ray job submit``), else start a local one.
    ``log_to_driver=False`` keeps the workers' output (and Ray's log deduplication notices) off this terminal;
    it stays in Ray's session logs (``/tmp/ray/session_latest/logs``)."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=log_to_driver)  # an existing cluster: never pass resource arguments
    else:
        ray.init(include_dashboard=False, configure_logging=False, log_to_driver=log_to_driver)


def quiet_data_progress() -> None:
    """Training prints one line per round; Ray Data's per-epoch bars inside the workers would drown it."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
