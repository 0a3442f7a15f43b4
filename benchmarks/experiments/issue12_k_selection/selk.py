import sys, time, torch, numpy as np
from jimray.cluster.consensus import select_k, consensus_mixture
from jimray.cluster.labels import clustering_accuracy
torch.set_num_threads(1)
d = torch.load(sys.argv[1], weights_only=False); truth = d["ds"]["classes"]
emb = d["embs"][-1].double(); R = int(sys.argv[2])
t0 = time.time()
k, table = select_k(emb, range(2, 11), restarts=R, score_dims=int(sys.argv[3]) if len(sys.argv) > 3 else None)
t1 = time.time()
lab = consensus_mixture(emb, 6, restarts=R)[0]
print(sys.argv[1].split("/")[-1], "restarts", R, "K", k, {r["k"]: round(r["heldout_loglik"] - max(x["heldout_loglik"] for x in table), 1) for r in table}, f"select {t1-t0:.0f}s", "acc@6", round(100*clustering_accuracy(truth, lab), 1), f"{time.time()-t1:.0f}s", flush=True)
