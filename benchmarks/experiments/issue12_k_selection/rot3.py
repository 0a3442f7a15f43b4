import sys, time, torch, numpy as np
from jimray.cluster.consensus import consensus_labels
from jimray.cluster.frame import frame_scores, spherical_mask, _normalised, FrameOptions
from jimray.train.frame_step import FrameRound
from jimray.align.multiref import refine_poses
from jimray.average.refine import refine_template, local_aligner
from jimray.conventions import invert_pose, compose_poses, rotation_error
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
d = torch.load(sys.argv[1], weights_only=False)
ds = d["ds"]; fr = FrameRound.from_state(d["frame"]); vols = ds["volumes"]; truth = ds["classes"]; n = len(truth)
tilt = torch.full((n,), 60.0)
lp = float(sys.argv[2])
t0 = time.time()
sc = frame_scores(vols, tilt, fr.references, fr.options, fr.reference_tilt_range_degrees)
lab = consensus_labels(d["embs"][-1].double(), 6)
t1 = time.time()
avgs = []
for c in range(6):
    m = np.flatnonzero(lab == c)
    j = int(sc.scores[m].mean(0).argmax())
    res = refine_template(vols[m].float(), tilt[m], sc.rotations[m, j], sc.shifts[m, j],
                          aligner=local_aligner(15.0, 3, lowpass_cycles_per_voxel=lp), iterations=int(sys.argv[4]) if len(sys.argv) > 4 else 2)
    avgs.append(res.average)
avgs = torch.stack(avgs)
t2 = time.time()
pairs = ds["pairs"]; src, tgt = pairs[:, 0], pairs[:, 1]
both = vols[np.concatenate([src, tgt])]; tb = torch.full((2*len(src),), 60.0)
cl = torch.as_tensor(np.concatenate([lab[src], lab[src]]))
s2 = frame_scores(both, tb, avgs, FrameOptions(), 90.0)
ii = torch.arange(2*len(src)); R, T = s2.rotations[ii, cl], s2.shifts[ii, cl]
mask = spherical_mask((32,)*3, 0.33*32)
r2, t2_, _ = refine_poses(_normalised(both.float()), _normalised(avgs.float()*mask), cl, R, tb, lowpass_cycles_per_voxel=lp)
ir, it = invert_pose(r2[:len(src)], t2_[:len(src)]); pr, pt = compose_poses(ir, it, r2[len(src):], t2_[len(src):])
e = rotation_error(ds["pair_rotations"], pr)
asym = truth[src] != 1
print(f"lp {lp} all {e.mean():.3f} no-TRiC {e[asym].mean():.3f} median {np.median(e):.3f}", [(int(c), round(float(e[truth[src]==c].mean()),2)) for c in np.unique(truth[src])], f"refine {t2-t1:.0f}s pairs {time.time()-t2:.0f}s")
