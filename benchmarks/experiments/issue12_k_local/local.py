"""The distinct test scored from the pose each particle already has in each cluster's frame (the package's
jimray.cluster.distinct.pose_half_scores) at a chosen low-pass, with or without the local refinement, on a set
saved by ../issue12_k_mutual/cache.py.  python local.py CACHE.pt LOWPASS K1,K2,.. REFINE_DEGREES [THREADS]
(REFINE_DEGREES 0: the frame's pose as it is; 10: the default, a third of the frame's 30-degree grid step)"""
import sys, json, time, torch, numpy as np
from jimray.cluster.consensus import consensus_mixture
from jimray.cluster.distinct import id_halves, class_half_averages, cluster_frames, pair_distinctness, pose_half_scores
from jimray.cluster.labels import clustering_accuracy
torch.set_num_threads(int(sys.argv[5]) if len(sys.argv) > 5 else 2)
d = torch.load(sys.argv[1], weights_only=False)
sc = d["scores"]; lowpass = float(sys.argv[2])
vols, truth = d["volumes"], np.asarray(d["classes"]); n = len(truth)
tilt = torch.full((n,), float(d["tilt"])); halves = id_halves(np.arange(n))
score = pose_half_scores(lowpass, refine_degrees=float(sys.argv[4]))
for k in [int(x) for x in sys.argv[3].split(",")]:
    t0 = time.time()
    lab = consensus_mixture(d["emb"].double(), k, seed=0, restarts=4)[0]
    frames = cluster_frames(sc.scores, lab, k)
    avg = class_half_averages(vols, tilt, lab, halves, k, sc, frames=frames)
    test = pair_distinctness(lab, score(vols, tilt, avg, sc.rotations[:, torch.as_tensor(frames)], halves))
    a, b, t, e = test.weakest()
    print(json.dumps({"set": sys.argv[1].split("/")[-1], "lowpass": lowpass, "refine": float(sys.argv[4]), "k": k,
                      "acc": round(100 * clustering_accuracy(truth, lab), 1), "t": round(t, 1), "d": round(e, 2),
                      "distinct": test.distinct(), "seconds": round(time.time() - t0, 1)}), flush=True)
