import sys, time, torch, numpy as np
from jimray.cluster.frame import FrameOptions, frame_scores, spherical_mask, _normalised
from jimray.train.frame_step import FrameRound
from jimray.align.multiref import refine_poses
from jimray.conventions import invert_pose, compose_poses, rotation_error
torch.set_num_threads(1)
d = torch.load(sys.argv[1], weights_only=False)
ds = d["ds"]; fr = FrameRound.from_state(d["frame"])
vols = ds["volumes"]; pairs = ds["pairs"]; classes = ds["classes"]
src, tgt = pairs[:, 0], pairs[:, 1]
tilts = np.full(2*len(src), ds["tilt_range_degrees"], np.float32)
both = vols[np.concatenate([src, tgt])]
for refs_name, refs in (("refs", fr.references), ("next", fr.next_references)):
    t0 = time.time()
    sc = frame_scores(both, tilts, refs, fr.options, 90.0)
    best = sc.scores[: len(src)].argmax(1); idx = torch.arange(len(src))
    bb = torch.cat([best, best])
    ii = torch.arange(2*len(src))
    R, T = sc.rotations[ii, bb], sc.shifts[ii, bb]
    def pair_err(R, T):
        ir, it = invert_pose(R[:len(src)], T[:len(src)])
        pr, pt = compose_poses(ir, it, R[len(src):], T[len(src):])
        e = rotation_error(ds["pair_rotations"], pr)
        return e
    e0 = pair_err(R, T)
    shape = tuple(refs.shape[-3:])
    mask = spherical_mask(shape, fr.options.mask_radius_fraction * min(shape))
    for steps, start in ((3, 15.0), (4, 20.0)):
        t1 = time.time()
        r2, t2, s2 = refine_poses(_normalised(both.float()), _normalised(refs.float() * mask), bb, R, tilts, start_degrees=start, steps=steps, lowpass_cycles_per_voxel=float(sys.argv[2]) if len(sys.argv)>2 else 0.25)
        e1 = pair_err(r2, t2)
        print(refs_name, steps, start, "grid", e0.mean().round(3), "refined", e1.mean().round(3), "median", np.median(e1).round(3), f"{time.time()-t1:.1f}s")
        for c in np.unique(classes[src]):
            m = classes[src] == c
            print("   class", c, m.sum(), e0[m].mean().round(2), e1[m].mean().round(2))
