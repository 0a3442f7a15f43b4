"""Cross-validated own-cluster score per K: S(K) = mean over particles of the score against the other-half average
of their own cluster; paired differences between K. python cv.py CACHE_others.pt [...]"""
import sys, numpy as np, torch
for f in sys.argv[1:]:
    d = torch.load(f, weights_only=False); ks = sorted(d["others"])
    own = {k: d["others"][k][1][np.arange(len(d["others"][k][0])), d["others"][k][0]] for k in ks}
    s = {k: own[k].mean() for k in ks}
    line = " ".join(f"{k}:{1000*s[k]:.2f}" for k in ks)
    # paired t of K vs K-1
    t = {k: (own[k] - own[k-1]).mean() / (own[k] - own[k-1]).std() * np.sqrt(len(own[k])) for k in ks[1:]}
    print(f.split("/")[-1][:-10], "argmax", max(ks, key=lambda k: s[k]), "|", line, "| t", " ".join(f"{k}:{t[k]:.1f}" for k in ks[1:]))
