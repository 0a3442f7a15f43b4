"""The distinct test scored at another low-pass (the frame scores at options.lowpass_cycles_per_voxel, 0.25):
weakest pooled pair (t, d) per K. python lowpass.py CACHE.pt LOWPASS K1,K2,.. [THREADS]"""
import sys, json, dataclasses, torch, numpy as np
from jimray.cluster.consensus import consensus_mixture
from jimray.cluster.distinct import id_halves, class_half_averages, pair_distinctness
from jimray.cluster.labels import clustering_accuracy
from jimray.train.frame_step import FrameRound, _scores
torch.set_num_threads(int(sys.argv[4]) if len(sys.argv) > 4 else 1)
d = torch.load(sys.argv[1], weights_only=False)
fr = FrameRound.from_state(d["frame"]); sc = d["scores"]
opts = dataclasses.replace(fr.options, lowpass_cycles_per_voxel=float(sys.argv[2]))
vols, truth = d["volumes"], np.asarray(d["classes"]); n = len(truth)
tilt = torch.full((n,), float(d["tilt"])); halves = id_halves(np.arange(n))
score = lambda v, t, refs: _scores(v, t, refs, opts, 90.0).scores
for k in [int(x) for x in sys.argv[3].split(",")]:
    lab = consensus_mixture(d["emb"].double(), k, seed=0, restarts=4)[0]
    test = pair_distinctness(vols, tilt, lab, halves, class_half_averages(vols, tilt, lab, halves, k, sc), score)
    a, b, t, e = test.weakest()
    print(json.dumps({"set": sys.argv[1].split("/")[-1], "lowpass": opts.lowpass_cycles_per_voxel, "k": k,
                      "acc": round(100 * clustering_accuracy(truth, lab), 1), "t": round(t, 1), "d": round(e, 2),
                      "distinct": test.distinct()}), flush=True)
