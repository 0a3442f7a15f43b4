"""Per K: accuracy and the held-out class-average pair statistics, pooled (the current rule) and per direction
(members of a preferring a's average, members of b preferring b's). python scan.py CACHE.pt [THREADS]"""
import sys, json, torch, numpy as np
from jimray.cluster.consensus import consensus_mixture
from jimray.cluster.distinct import id_halves, class_half_averages, half_counts
from jimray.cluster.labels import clustering_accuracy
from jimray.train.frame_step import FrameRound, _scores
torch.set_num_threads(int(sys.argv[2]) if len(sys.argv) > 2 else 1)
d = torch.load(sys.argv[1], weights_only=False)
fr = FrameRound.from_state(d["frame"]); sc = d["scores"]
vols, truth = d["volumes"], np.asarray(d["classes"]); n = len(truth)
tilt = torch.full((n,), float(d["tilt"]))
halves = id_halves(np.arange(n))
out = []; others = {}
for k in range(2, 11):
    lab = consensus_mixture(d["emb"].double(), k, seed=0, restarts=4)[0]
    avg = class_half_averages(vols, tilt, lab, halves, k, sc)
    s = _scores(vols, tilt, avg.reshape(2 * k, *avg.shape[-3:]), fr.options, 90.0).scores.double().reshape(n, k, 2)
    other = s[torch.arange(n), :, torch.as_tensor(1 - halves)]  # (n, K)
    lab_t = torch.as_tensor(lab); others[k] = (lab, other.numpy())
    D = np.full((k, k), np.inf); T = np.full((k, k), np.inf); Dp = np.full((k, k), np.inf); Tp = np.full((k, k), np.inf)
    for a in range(k):
        for b in range(k):
            if a == b: continue
            da = (other[lab_t == a, a] - other[lab_t == a, b])
            db = (other[lab_t == b, b] - other[lab_t == b, a])
            if len(da) >= 2:
                D[a, b] = float(da.mean() / da.std(unbiased=False).clamp_min(1e-12)); T[a, b] = D[a, b] * np.sqrt(len(da))
            else:
                D[a, b] = T[a, b] = -np.inf
            both = torch.cat([da, db])
            Dp[a, b] = float(both.mean() / both.std(unbiased=False).clamp_min(1e-12)); Tp[a, b] = Dp[a, b] * np.sqrt(len(both))
    off = ~np.eye(k, dtype=bool)
    hc = half_counts(lab, halves, k).min()
    row = {"k": k, "acc": round(100 * clustering_accuracy(truth, lab), 1), "sizes": np.bincount(lab, minlength=k).tolist(),
           "min_half": int(hc), "pooled_d": round(float(Dp[off].min()), 2), "pooled_t": round(float(Tp[off].min()), 1),
           "dir_d": round(float(D[off].min()), 2), "dir_t": round(float(T[off].min()), 1),
           "D": np.round(D, 2).tolist()}
    out.append(row)
    print(json.dumps({x: y for x, y in row.items() if x != "D"}), flush=True)
json.dump(out, open(sys.argv[1].replace(".pt", "_scan.json"), "w"))
torch.save({"truth": truth, "others": others}, sys.argv[1].replace(".pt", "_others.pt"))
