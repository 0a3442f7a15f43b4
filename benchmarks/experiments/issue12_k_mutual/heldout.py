"""K by the held-out likelihood (gmm.k_selection: heldout, the defaults) on saved sets. python heldout.py CACHE.pt..."""
import sys, torch
from jimray.cluster.consensus import select_k
from jimray.config import GMMConfig
torch.set_num_threads(1)
g = GMMConfig()
for f in sys.argv[1:]:
    d = torch.load(f, weights_only=False)
    k, _ = select_k(d["emb"].double(), tuple(range(2, 11)), seed=0, restarts=g.consensus_restarts, score_dims=g.selection_pca_dims)
    print(f.split("/")[-1], "heldout K", k, flush=True)
