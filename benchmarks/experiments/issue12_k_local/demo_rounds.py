"""The distinct test on a `make demo` run's rounds, offline: each checkpoint's frame re-scores the demo's
volumes, the consensus (training's defaults) gives the partitions, and the test runs with both scorings.
python demo_rounds.py RUN_DIR K1,K2,.. [THREADS]"""
import sys, json, glob, torch, numpy as np
from jimray.cluster.consensus import consensus_mixture
from jimray.cluster.distinct import (id_halves, class_half_averages, cluster_frames, pair_distinctness,
                                     pose_half_scores, search_half_scores)
from jimray.cluster.frame import apply_frame_stats, frame_scores
from jimray.cluster.labels import clustering_accuracy
from jimray.config import GMMConfig
from jimray.io.shards import read_shard
from jimray.train.clustering import _member_kwargs
from jimray.train.frame_step import FrameRound, _scores
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
run = sys.argv[1]
cols = [read_shard(p) for p in sorted(glob.glob(f"{run}/data/shards/*.parquet"))]
ids = np.concatenate([c["id"] for c in cols]); order = np.argsort(ids)
vols = torch.as_tensor(np.concatenate([c["volume"] for c in cols]))[order].float()
truth = np.concatenate([c["true_class"] for c in cols])[order]; ids = ids[order]
tilt = float(np.concatenate([c["tilt_range_degrees"] for c in cols])[0]); tilts = torch.full((len(ids),), tilt)
g = GMMConfig(); halves = id_halves(ids, g.seed)
for ck in sorted(glob.glob(f"{run}/train/checkpoints/checkpoint_*/state.pt")):
    state = torch.load(ck, weights_only=False)
    fr = FrameRound.from_state(state["frame_state"])
    sc = frame_scores(vols, tilts, fr.references, fr.options, fr.reference_tilt_range_degrees)
    emb = apply_frame_stats(sc.scores, fr.stats)
    scorers = {"pose": pose_half_scores(fr.options.lowpass_cycles_per_voxel, fr.options.max_shift_voxels, 0.0),
               "pose+refine": pose_half_scores(fr.options.lowpass_cycles_per_voxel, fr.options.max_shift_voxels, 10.0),
               "search": search_half_scores(lambda v, t, r: _scores(v, t, r, fr.options, 90.0).scores)}
    for k in [int(x) for x in sys.argv[2].split(",")]:
        lab = consensus_mixture(emb.double(), k, g.consensus_dims, g.consensus_seeds, seed=g.seed,
                                restarts=g.consensus_restarts, **_member_kwargs(g))[0]
        frames = cluster_frames(sc.scores, lab, k)
        avg = class_half_averages(vols, tilts, lab, halves, k, sc, frames=frames)
        for name, score in scorers.items():
            test = pair_distinctness(lab, score(vols, tilts, avg, sc.rotations[:, torch.as_tensor(frames)], halves))
            a, b, t, e = test.weakest()
            print(json.dumps({"round": int(state["round_index"]), "k": k, "scoring": name,
                              "acc": round(100 * clustering_accuracy(truth, lab), 1), "pair": [a, b],
                              "t": round(t, 1), "d": round(e, 2), "distinct": test.distinct()}), flush=True)
