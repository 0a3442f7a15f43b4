import sys, torch, numpy as np
from jimray.cluster.consensus import consensus_labels
from jimray.cluster.gmm import GaussianMixture
from jimray.cluster.pca import whitened_projection
from jimray.cluster.labels import clustering_accuracy
torch.set_num_threads(1)
d = torch.load(sys.argv[1], weights_only=False); truth = d["ds"]["classes"]
for r in [int(x) for x in sys.argv[2].split(",")]:
    emb = d["embs"][r].double()
    zf = whitened_projection(emb, None)[0]; z16 = whitened_projection(emb, 16)[0]; z8 = whitened_projection(emb, 8)[0]
    out = []
    for s in range(6):
        lab = consensus_labels(emb, 6, seed=s)
        lls = []
        for z in (zf, z16, z8):
            g = GaussianMixture(6, covariance_type="diag", reg_covar=1e-3).fit_labels(z, lab)
            lls.append(round(g.score(z) * len(lab), 0))
        out.append((s, round(100*clustering_accuracy(truth, lab), 1), *lls))
    print(sys.argv[1].split("/")[-1], "round", r, out, flush=True)
