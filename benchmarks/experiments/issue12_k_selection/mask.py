import sys, time, torch, numpy as np
import torch.nn.functional as F
import jimray.cluster.frame as fm
from jimray.bench.methods import CompareOptions
from jimray.cluster.frame import FrameOptions, spherical_mask
from jimray.cluster.reduce import LocalReducer
from jimray.train.frame_step import frame_step
from jimray.cluster.consensus import consensus_labels
from jimray.cluster.labels import clustering_accuracy
torch.set_num_threads(int(sys.argv[3]))
mode = sys.argv[2]
def auto_mask(refs, sphere):
    x = refs.float()
    k = torch.arange(-4, 5, dtype=torch.float32); g = torch.exp(-k**2 / (2 * 1.5**2)); g /= g.sum()
    y = x[:, None]
    y = F.conv3d(y, g.view(1,1,-1,1,1), padding=(4,0,0)); y = F.conv3d(y, g.view(1,1,1,-1,1), padding=(0,4,0)); y = F.conv3d(y, g.view(1,1,1,1,-1), padding=(0,0,4))
    y = y[:, 0] * sphere
    inner = spherical_mask(tuple(x.shape[-3:]), 4.0, 2.0)
    sign = torch.sign(((y * inner).sum((1,2,3)) / inner.sum() - (y * sphere).sum((1,2,3)) / sphere.sum())).view(-1,1,1,1)
    y = y * sign
    thr = float(sys.argv[4]) * y.amax((1,2,3), keepdim=True)
    b = (y > thr).float()[:, None]
    b = F.max_pool3d(b, 5, 1, 2)
    b = F.avg_pool3d(b, 5, 1, 2)
    return (b[:, 0] * sphere).clamp(0, 1)
orig = fm.frame_scores
def frame_scores(volumes, tilts, references, options, reference_tilt_range_degrees=90.0):
    shape = tuple(references.shape[-3:])
    sphere = spherical_mask(shape, options.mask_radius_fraction * min(shape)).to(references.dtype)
    mask = auto_mask(references, sphere) if reference_tilt_range_degrees >= 90 else sphere
    return fm.score_references(fm._normalised(volumes.float()), fm._normalised(references.float() * mask), tilts,
        angular_step_degrees=options.angular_step_degrees, max_shift_voxels=options.max_shift_voxels,
        lowpass_cycles_per_voxel=options.lowpass_cycles_per_voxel, reference_tilt_range_degrees=reference_tilt_range_degrees)
if mode == "auto":
    import jimray.train.frame_step as fs
    fs.frame_scores = frame_scores
d = torch.load(sys.argv[1], weights_only=False); ds = d["ds"]; truth = ds["classes"]; n = len(truth)
ids, tilts = np.arange(n), np.full(n, 60.0, np.float32)
frame = None; t0 = time.time(); accs = []
for r in range(5):
    emb, frame = frame_step(ds["volumes"], tilts, ids, 32, FrameOptions(), LocalReducer(), frame)
    accs.append(round(100 * clustering_accuracy(truth, consensus_labels(emb.double(), 6)), 1))
print(sys.argv[1], mode, sys.argv[4], accs, f"{time.time()-t0:.0f}s", flush=True)
