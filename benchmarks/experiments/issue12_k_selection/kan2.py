import sys, torch, numpy as np
from jimray.cluster.consensus import consensus_labels
from jimray.cluster.gmm import GaussianMixture
from jimray.cluster.pca import whitened_projection
torch.set_num_threads(1)
d = torch.load(sys.argv[1], weights_only=False)
emb = d["embs"][-1].double(); truth = d["ds"]["classes"]
g = torch.Generator().manual_seed(0)
fold = torch.rand(emb.shape[0], generator=g) < 0.5
dims = [4, 8, 12, 16, 24, None]
zs = {dd: whitened_projection(emb, dd)[0] for dd in dims}
res = {dd: {} for dd in dims}
for k in range(2, 10):
    labs = {}
    for tr in (fold, ~fold):
        labs[bool(tr[0])] = consensus_labels(emb[tr], k)
    for dd in dims:
        z = zs[dd]; tot = 0
        for tr in (fold, ~fold):
            gmm = GaussianMixture(k, covariance_type="diag", reg_covar=1e-3).fit_labels(z[tr], labs[bool(tr[0])])
            tot += gmm.score(z[~tr]) * float((~tr).sum())
        res[dd][k] = tot
for dd in dims:
    best = max(res[dd], key=res[dd].get)
    print(dd, "best K", best, {k: round(v - res[dd][best], 1) for k, v in res[dd].items()})
