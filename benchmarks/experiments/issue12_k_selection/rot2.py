import sys, time, torch, numpy as np
from jimray.bench.methods import CompareOptions
from jimray.bench.compare import compare_maps
from jimray.cluster.frame import FrameOptions, frame_scores, spherical_mask, _normalised
from jimray.align.multiref import refine_poses
from jimray.conventions import invert_pose, compose_poses, rotation_error
torch.set_num_threads(1)
d = torch.load(sys.argv[1], weights_only=False)
ds = d["ds"]; pairs = ds["pairs"]; classes = ds["classes"]
S = ("6zu5_ribosome","4v8r_tric","7cth_dengue_patch","6msm_cftr","3pwp_tcr_pmhc","7ddo_ace2_rbd")
maps = torch.stack(compare_maps(CompareOptions(structures=S)))
src, tgt = pairs[:, 0], pairs[:, 1]
tilts = np.full(2*len(src), ds["tilt_range_degrees"], np.float32)
both = ds["volumes"][np.concatenate([src, tgt])]
bb = torch.as_tensor(np.concatenate([classes[src], classes[src]]))
for lp in (0.25, 0.4):
    opts = FrameOptions(lowpass_cycles_per_voxel=lp)
    sc = frame_scores(both, tilts, maps, opts, 90.0)
    ii = torch.arange(2*len(src)); R, T = sc.rotations[ii, bb], sc.shifts[ii, bb]
    mask = spherical_mask((32,)*3, 0.33*32)
    r2, t2, s2 = refine_poses(_normalised(both.float()), _normalised(maps.float()*mask), bb, R, tilts, lowpass_cycles_per_voxel=lp)
    ir, it = invert_pose(r2[:len(src)], t2[:len(src)]); pr, pt = compose_poses(ir, it, r2[len(src):], t2[len(src):])
    e = rotation_error(ds["pair_rotations"], pr)
    print("true maps lp", lp, e.mean().round(3), [ (c, e[classes[src]==c].mean().round(2)) for c in np.unique(classes[src])])
