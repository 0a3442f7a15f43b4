import sys, torch, numpy as np
from jimray.cluster.consensus import consensus_labels
from jimray.cluster.frame import frame_scores
from jimray.train.frame_step import FrameRound
from scipy.spatial.transform import Rotation
torch.set_num_threads(2)
d = torch.load(sys.argv[1], weights_only=False)
ds = d["ds"]; fr = FrameRound.from_state(d["frame"]); vols = ds["volumes"]; truth = ds["classes"]; n = len(truth)
tilt = torch.full((n,), 60.0)
sc = frame_scores(vols, tilt, fr.references, fr.options, fr.reference_tilt_range_degrees)
lab = consensus_labels(d["embs"][-1].double(), int(sys.argv[2]))
for c in range(lab.max()+1):
    m = lab == c
    tc = np.bincount(truth[m]).argmax()
    if (truth == tc).sum() > m.sum() + 5:
        others = [cc for cc in range(lab.max()+1) if np.bincount(truth[lab == cc], minlength=6).argmax() == tc]
        print("class", tc, "split into", others, [int((lab == o).sum()) for o in others])
        allm = np.flatnonzero(truth == tc)
        j = int(sc.scores[allm].mean(0).argmax())
        off = sc.rotations[allm, j].double() @ ds["rotations"][allm].double().transpose(1, 2)
        rv = Rotation.from_matrix(off.numpy())
        ref = rv[0]
        ang = np.degrees((rv * ref.inv()).magnitude())
        for o in others:
            print("  sub", o, "angle to first offset", np.round(np.sort(ang[lab[allm] == o]), 0)[:40])
        break
