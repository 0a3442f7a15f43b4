"""Is an over-split a split by orientation to the missing wedge? (1) per cluster the spread of the wedge axis
(lab z) in the reference frame; (2) the distinct test with half-averages restricted to the Fourier voxels every
half-average covers (weight >= W in all 2K halves), so no average is preferred for where its members have data.
python support.py CACHE.pt W [THREADS]"""
import sys, json, torch, numpy as np
from jimray.cluster.consensus import consensus_mixture
from jimray.cluster.distinct import id_halves, _best_reference
from jimray.cluster.reduce import LocalReducer
from jimray.average.wedge_average import WedgeAccumulator
from jimray.cluster.labels import clustering_accuracy
from jimray.train.frame_step import FrameRound, _scores
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
W = float(sys.argv[2])
d = torch.load(sys.argv[1], weights_only=False)
fr = FrameRound.from_state(d["frame"]); sc = d["scores"]
vols, truth = d["volumes"], np.asarray(d["classes"]); n = len(truth)
tilt = torch.full((n,), float(d["tilt"]))
halves = id_halves(np.arange(n)); shape = (32, 32, 32)

def stats(other, lab, k):
    lab_t = torch.as_tensor(lab); best = (np.inf, None)
    for a in range(k):
        for b in range(a + 1, k):
            both = torch.cat([other[lab_t == a, a] - other[lab_t == a, b], other[lab_t == b, b] - other[lab_t == b, a]])
            e = float(both.mean() / both.std(unbiased=False).clamp_min(1e-12))
            if e < best[0]: best = (e, (a, b), e * np.sqrt(len(both)))
    return best

for k in range(4, 10):
    lab = consensus_mixture(d["emb"].double(), k, seed=0, restarts=4)[0]
    bestref = _best_reference(sc.scores, lab, k, LocalReducer())
    spec, wt = [], []
    axis_spread = []
    for c in range(k):
        j = int(bestref[c])
        m = np.flatnonzero(lab == c)
        zref = sc.rotations[m, j].transpose(-1, -2) @ torch.tensor([0., 0., 1.])  # wedge axis in reference frame
        axis_spread.append(round(float(torch.linalg.eigvalsh(zref.T @ zref / len(m)).max()), 2))
        for h in (0, 1):
            mm = np.flatnonzero((lab == c) & (halves == h))
            acc = WedgeAccumulator(shape).add(vols[mm].float(), sc.rotations[mm, j], sc.shifts[mm, j], tilt[mm])
            spec.append(acc.spectrum_sum); wt.append(acc.weight_sum)
    spec, wt = torch.stack(spec), torch.stack(wt)
    res = {}
    for name, support in (("all", torch.ones_like(wt[0], dtype=torch.bool)), (f"common>={W:g}", (wt >= W).all(0))):
        avg = torch.fft.irfftn(torch.where(support, spec / wt.clamp_min(1.0), 0), s=shape, dim=(-3, -2, -1)).float()
        s = _scores(vols, tilt, avg, fr.options, 90.0).scores.double().reshape(n, k, 2)
        other = s[torch.arange(n), :, torch.as_tensor(1 - halves)]
        e, pair, t = stats(other, lab, k)
        res[name] = (round(e, 2), pair, round(t, 1), round(float(support.float().mean()), 2))
    print(json.dumps({"k": k, "acc": round(100 * clustering_accuracy(truth, lab), 1),
                      "sizes": np.bincount(lab, minlength=k).tolist(), "axis_eig_max": axis_spread, **res}), flush=True)
