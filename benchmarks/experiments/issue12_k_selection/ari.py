import sys, torch, numpy as np
from sklearn.metrics import adjusted_rand_score as ari
from jimray.cluster.consensus import consensus_labels
torch.set_num_threads(1)
d = torch.load(sys.argv[1], weights_only=False); rnd = int(sys.argv[2]) if len(sys.argv) > 2 else 4
emb = d["embs"][rnd].double()
out = []
for k in range(4, 10):
    labs = [consensus_labels(emb, k, seed=10 * i) for i in range(4)]
    a = [ari(labs[i], labs[j]) for i in range(4) for j in range(i + 1, 4)]
    out.append((k, round(min(a), 2), round(float(np.mean(a)), 2)))
print(sys.argv[1].split("/")[-1], rnd, out, flush=True)
