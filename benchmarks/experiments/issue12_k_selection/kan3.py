import sys, time, torch, numpy as np
from jimray.cluster.consensus import consensus_labels
from jimray.cluster.frame import frame_scores, FrameOptions
from jimray.train.frame_step import FrameRound
from jimray.average.wedge_average import WedgeAccumulator
from jimray.cluster.labels import clustering_accuracy
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
d = torch.load(sys.argv[1], weights_only=False)
ds = d["ds"]; fr = FrameRound.from_state(d["frame"])
vols = ds["volumes"]; truth = ds["classes"]; n = len(truth)
tilt = torch.full((n,), float(ds["tilt_range_degrees"]))
emb = d["embs"][-1].double()
t0 = time.time()
sc = frame_scores(vols, tilt, fr.references, fr.options, fr.reference_tilt_range_degrees)
print("scores", time.time()-t0)
half = np.random.default_rng(0).integers(0, 2, n)
for k in range(2, 10):
    lab = consensus_labels(emb, k)
    acc = clustering_accuracy(truth, lab)
    avgs = []
    jstar = []
    for c in range(k):
        m = lab == c
        j = int(sc.scores[m].mean(0).argmax()); jstar.append(j)
        for h in (0, 1):
            mm = np.flatnonzero(m & (half == h))
            if len(mm) == 0:
                avgs.append(fr.references[j]); continue
            acc_ = WedgeAccumulator((32,)*3).add(vols[mm].float(), sc.rotations[mm, j], sc.shifts[mm, j], tilt[mm])
            avgs.append(acc_.result(1.0)[0])
    avgs = torch.stack(avgs)  # (2k)
    s2 = frame_scores(vols, tilt, avgs, fr.options, 90.0).scores.double()  # (n, 2k)
    # score of particle vs class c other half: column 2c + (1-h)
    other = torch.stack([s2[torch.arange(n), 2*c + torch.as_tensor(1-half)] for c in range(k)], 1)  # (n,k)
    rows = []
    for a in range(k):
        for b in range(a+1, k):
            ia = lab == a; ib = lab == b
            pa = (other[ia, a] > other[ia, b]).double().mean().item()
            pb = (other[ib, b] > other[ib, a]).double().mean().item()
            diff = torch.cat([other[ia, a]-other[ia, b], other[ib, b]-other[ib, a]])
            t = (diff.mean()/diff.std()*np.sqrt(len(diff))).item()
            rows.append((a, b, int(ia.sum()), int(ib.sum()), round(t,1), round(t/np.sqrt(len(diff)),2)))
    wt = min(rows, key=lambda r: r[4]); wd = min(rows, key=lambda r: r[5])
    ok = all(r[4] >= 4 and r[5] >= 0.6 for r in rows)
    print(f"K={k} acc={acc:.3f} sizes={np.bincount(lab, minlength=k).tolist()} worst t {wt} worst d {wd} pass={ok} {time.time()-t0:.0f}s", flush=True)
