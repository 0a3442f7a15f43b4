"""Simulate a compare set and run 5 common-frame rounds; save volumes, truth, final embedding and frame.
python cache.py STRUCTS SNR [THREADS] [PER_CLASS]   (STRUCTS: emb or pseudo:N:SEED)"""
import sys, time, torch, numpy as np
from jimray.bench.methods import CompareOptions
from jimray.bench.compare import make_dataset, compare_maps
from jimray.cluster.frame import FrameOptions
from jimray.cluster.reduce import LocalReducer
from jimray.train.frame_step import frame_step
torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 1)
structs = sys.argv[1]; snr = float(sys.argv[2])
S = ("6zu5_ribosome","4v8r_tric","7cth_dengue_patch","6msm_cftr","3pwp_tcr_pmhc","7ddo_ace2_rbd") if structs == "emb" else (structs,)
per = int(sys.argv[4]) if len(sys.argv) > 4 else 50
opts = CompareOptions(structures=S, per_class=per, pairs=40, snrs=(snr,))
ds = make_dataset(snr, opts, compare_maps(opts))
ids, tilts = np.arange(len(ds.classes)), np.full(len(ds.classes), ds.tilt_range_degrees, np.float32)
frame = None; t0 = time.time()
for r in range(5):
    emb, frame = frame_step(ds.volumes, tilts, ids, 32, FrameOptions(), LocalReducer(), frame)
print(structs, snr, "frame", round(time.time() - t0), "s", flush=True)
name = f"/tmp/exp/{structs.replace(':','_')}_{snr:g}_{per}.pt"
torch.save({"volumes": ds.volumes, "classes": ds.classes, "tilt": ds.tilt_range_degrees, "emb": emb,
            "frame": frame.get_state(), "scores": frame.scores}, name)
print("saved", name)
