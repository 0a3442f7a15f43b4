"""Seconds of the distinct test's scoring (every particle against 2K half-averages) at two low-passes.
python cost.py CACHE.pt K [THREADS]"""
import sys, time, dataclasses, torch, numpy as np
from jimray.cluster.consensus import consensus_mixture
from jimray.cluster.distinct import id_halves, class_half_averages
from jimray.train.frame_step import FrameRound, _scores
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
d = torch.load(sys.argv[1], weights_only=False); k = int(sys.argv[2])
fr = FrameRound.from_state(d["frame"]); vols = d["volumes"]; n = vols.shape[0]
tilt = torch.full((n,), float(d["tilt"])); halves = id_halves(np.arange(n))
lab = consensus_mixture(d["emb"].double(), k, seed=0, restarts=4)[0]
avg = class_half_averages(vols, tilt, lab, halves, k, d["scores"]).reshape(2 * k, 32, 32, 32)
for lp in (0.25, 0.35):
    opts = dataclasses.replace(fr.options, lowpass_cycles_per_voxel=lp)
    t0 = time.perf_counter(); _scores(vols, tilt, avg, opts, 90.0); dt = time.perf_counter() - t0
    print(f"lowpass {lp}: {dt:.1f} s for {n} particles x {2 * k} averages", flush=True)
