LP=$1; REFINE=${2:-10}  # low-pass (cycles/voxel), refinement (degrees); sets saved by ../issue12_k_mutual/cache.py in /tmp/exp
for s in emb_0.03_50:5,6,7 emb_0.05_50:5,6,7 emb_0.1_50:5,6,7 pseudo_6_1_0.1_50:5,6,7 pseudo_6_1_0.05_50:5,6,7 pseudo_6_3_0.1_50:5,6,7 pseudo_6_3_0.05_50:5,6,7 pseudo_4_5_0.05_50:3,4,5 pseudo_8_7_0.05_50:7,8,9 pseudo_6_11_0.03_50:5,6,7; do
  f=${s%%:*}; ks=${s##*:}
  python benchmarks/experiments/issue12_k_local/local.py /tmp/exp/$f.pt $LP $ks $REFINE 2
done
