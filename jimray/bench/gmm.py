"""``jimray bench gmm``: fit time of our torch GMM against scikit-learn's GaussianMixture on CPU.

Both estimators start from the same parameters (our k-means++ seeding + one EM step, timed separately)
and run with the same ``max_iter``/``tol`` and thread count, so the times compare EM iterations only.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch
import typer
from rich.console import Console

from jimray.bench.common import markdown_table, timer, write_results
from jimray.cluster.gmm import GaussianMixture

console = Console(stderr=True)


def make_mixture_data(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """n points (n, d) from k Gaussians with random means (std 0.5, overlapping) and random full covariances."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0.0, 0.5, (k, d))
    mix = rng.normal(size=(k, d, d)) / np.sqrt(d)
    labels = rng.integers(0, k, n)
    x = np.empty((n, d))
    for c in range(k):
        rows = np.flatnonzero(labels == c)
        x[rows] = means[c] + rng.normal(size=(len(rows), d)) @ mix[c].T
    return x


def _load_average() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def bench_one(x: np.ndarray, k: int, max_iter: int, tol: float, with_sklearn: bool) -> list[dict]:
    """Rows for one data set: our fit and (optionally) sklearn's from the same starting parameters."""
    from sklearn.mixture import GaussianMixture as SkGaussianMixture

    n, d = x.shape
    with timer() as t_init:
        start = GaussianMixture(k, max_iter=1, tol=0.0, random_state=0).fit(x)
    start_state = {**start.get_state(), "warm_start": True, "max_iter": max_iter, "tol": tol}
    ours = GaussianMixture.from_state(start_state)
    with timer() as t_fit:
        ours.fit(x)
    base = {"n": n, "d": d, "K": k, "max_iter": max_iter, "tol": tol, "init_s": t_init()}
    rows = [{**base, "impl": "jimray (torch, float64)", "n_iter": ours.n_iter_, "converged": ours.converged_,
             "fit_s": t_fit(), "s_per_iter": t_fit() / ours.n_iter_, "mean_loglik": ours.score(x)}]
    if with_sklearn:
        chol = start.precisions_cholesky_.numpy()
        sk = SkGaussianMixture(k, covariance_type="full", max_iter=max_iter, tol=tol, reg_covar=start.reg_covar,
                               init_params="random_from_data", weights_init=start.weights_.numpy(),
                               means_init=start.means_.numpy(), precisions_init=chol @ chol.transpose(0, 2, 1))
        with timer() as t_sk:
            sk.fit(x)
        rows.append({**base, "impl": "scikit-learn GaussianMixture", "n_iter": sk.n_iter_,
                     "converged": bool(sk.converged_), "fit_s": t_sk(), "s_per_iter": t_sk() / sk.n_iter_,
                     "mean_loglik": float(sk.score(x))})
        rows[0]["loglik_diff_vs_sklearn"] = abs(rows[0]["mean_loglik"] - rows[1]["mean_loglik"])
        rows[0]["speedup_per_iter"] = rows[1]["s_per_iter"] / rows[0]["s_per_iter"]
    return rows


def register(bench_app: typer.Typer) -> None:
    @bench_app.command("gmm")
    def gmm(
        sizes: str = typer.Option("100000,1000000", help="comma-separated numbers of embeddings"),
        dim: int = typer.Option(32, help="embedding dimension d"),
        components: int = typer.Option(20, help="mixture components K"),
        max_iter: int = typer.Option(100, help="EM iterations at most (both estimators)"),
        large_max_iter: int = typer.Option(5, help="cap on max_iter for n >= 1e6 (per-iteration time is reported)"),
        tol: float = typer.Option(1e-3, help="convergence tolerance on the mean log-likelihood (both)"),
        threads: int = typer.Option(0, help="CPU threads for torch and BLAS (0 = library defaults)"),
        sklearn: bool = typer.Option(True, help="also fit scikit-learn's GaussianMixture"),
        out: str = typer.Option("benchmarks", help="folder for gmm.json and gmm.md"),
    ) -> None:
        """GMM fit time (full covariance) vs scikit-learn, same data, start, max_iter and tol."""
        from threadpoolctl import threadpool_limits

        if threads > 0:
            torch.set_num_threads(threads)
        ns = [int(float(s)) for s in sizes.split(",") if s.strip()]
        rows: list[dict] = []
        with threadpool_limits(limits=threads if threads > 0 else None):
            for n in ns:
                cap = min(max_iter, large_max_iter) if n >= 1_000_000 else max_iter
                console.print(f"[bold]gmm[/] n={n} d={dim} K={components} max_iter={cap}: generating and fitting ...")
                rows += bench_one(make_mixture_data(n, dim, components), components, cap, tol, sklearn)
                console.print(rows[-1] if not sklearn else rows[-2:])
        cols = ["n", "d", "K", "impl", "max_iter", "n_iter", "converged", "init_s", "fit_s", "s_per_iter",
                "mean_loglik", "loglik_diff_vs_sklearn", "speedup_per_iter"]
        notes = (f"Threads: {torch.get_num_threads()} (torch and BLAS). Load average at the end: {_load_average()}."
                 " Both start from the same parameters (our k-means++ on a 20k-row sample + 10 Lloyd steps + one"
                 " EM step; `init_s`), full covariances, float64, same max_iter and tol.\n\n")
        md = notes + markdown_table(rows, cols)
        command = "jimray bench gmm " + " ".join(sys.argv[3:]) if len(sys.argv) > 3 else "jimray bench gmm"
        write_results(out, "gmm", {"rows": rows}, md, command)
        typer.echo(md)
