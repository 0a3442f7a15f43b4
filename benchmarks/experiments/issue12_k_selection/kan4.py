import sys, time, torch, numpy as np
from jimray.cluster.consensus import consensus_labels
from jimray.cluster.gmm import GaussianMixture
from jimray.cluster.pca import whitened_projection
from jimray.cluster.frame import frame_scores
from jimray.train.frame_step import FrameRound
from jimray.average.wedge_average import WedgeAccumulator
from jimray.cluster.labels import clustering_accuracy
torch.set_num_threads(1)
d = torch.load(sys.argv[1], weights_only=False)
ds = d["ds"]; fr = FrameRound.from_state(d["frame"]); vols = ds["volumes"]; truth = ds["classes"]; n = len(truth)
tilt = torch.full((n,), float(ds["tilt_range_degrees"]))
emb = d["embs"][-1].double()
g = torch.Generator().manual_seed(0); fold = torch.rand(n, generator=g) < 0.5
z = whitened_projection(emb, 16)[0]
ll = {}
for k in range(2, 11):
    tot = 0
    for tr in (fold, ~fold):
        lab = consensus_labels(emb[tr], k)
        gmm = GaussianMixture(k, covariance_type="diag", reg_covar=1e-3).fit_labels(z[tr], lab)
        tot += gmm.score(z[~tr]) * float((~tr).sum())
    ll[k] = tot
order = sorted(ll, key=ll.get, reverse=True)
print("LL16 order", [(k, round(ll[k]-ll[order[0]], 1)) for k in order], flush=True)
sc = frame_scores(vols, tilt, fr.references, fr.options, fr.reference_tilt_range_degrees)
half = np.random.default_rng(0).integers(0, 2, n)
for k in order:
    lab = consensus_labels(emb, k)
    avgs = []
    for c in range(k):
        m = lab == c
        j = int(sc.scores[m].mean(0).argmax())
        for h in (0, 1):
            mm = np.flatnonzero(m & (half == h))
            avgs.append(WedgeAccumulator((32,)*3).add(vols[mm].float(), sc.rotations[mm, j], sc.shifts[mm, j], tilt[mm]).result(1.0)[0] if len(mm) else fr.references[j])
    s2 = frame_scores(vols, tilt, torch.stack(avgs), fr.options, 90.0).scores.double()
    other = torch.stack([s2[torch.arange(n), 2*c + torch.as_tensor(1-half)] for c in range(k)], 1)
    rows = []
    for a in range(k):
        for b in range(a+1, k):
            ia, ib = lab == a, lab == b
            diff = torch.cat([other[ia, a]-other[ia, b], other[ib, b]-other[ib, a]])
            t = (diff.mean()/diff.std()*np.sqrt(len(diff))).item()
            rows.append((a, b, round(t, 1), round(t/np.sqrt(len(diff)), 2)))
    ok = all(r[2] >= 4 and r[3] >= 0.6 for r in rows)
    print(f"K={k} acc={clustering_accuracy(truth, lab):.3f} worst t {min(rows, key=lambda r: r[2])} worst d {min(rows, key=lambda r: r[3])} pass={ok}", flush=True)
    if ok:
        print("CHOSEN", k); break
