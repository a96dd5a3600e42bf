#!/usr/bin/env bash
# The walk-through of docs/real_images.md, end to end: real HST lenses and galaxies in, embedded beside
# simulations, neighbours of one real lens by name, theta_E of the real lenses from a model fine-tuned on
# simulations. DATA: the folder that holds the real-lens development set (real_lenses/); OUT: outputs.
# ~15 min on a 2-core CPU.
set -euo pipefail
DATA=${DATA:?set DATA to the folder that holds real_lenses/}
OUT=${OUT:-walk}
BIN=${BIN:-.venv/bin}
HL="$BIN/hpc-lensiam"
R="$DATA/real_lenses"
mkdir -p "$OUT"

# 1. Real cutouts onto the hst grid (110 px x 0.05"/px), named, with their noise, PSF and labels
"$HL" ingest "$R"/desi_hst/DESI*_F140W.h5 --labels "$R/desi_hst/labels.csv" --out "$OUT/desi" --preview "$OUT/desi.png"
"$HL" ingest "$R"/dolphin_hst/*/image_*.h5 --pad --out "$OUT/dolphin" --preview "$OUT/dolphin.png"
"$HL" ingest "$R/aegis_galaxies/AEGIS_F814w_images_01.fits" --each-hdu --input-pixel-scale 0.03 --pad --out "$OUT/aegis"

# 2. Simulations on the same grid: LenSiam pairs to pretrain on, single images labelled with theta_E
"$BIN/mpiexec" -n 2 "$HL" simulate --out "$OUT/pairs" --pairs 512 --shard-size 64 --seed 0
"$BIN/mpiexec" -n 2 "$HL" simulate --out "$OUT/sims" --samples single --preset hst --pairs 1200 --shard-size 200 --seed 11
"$BIN/torchrun" --standalone --nproc_per_node 2 -m hpc_lensiam train --config configs/demo.yaml \
    --data "$OUT/pairs" --out "$OUT/run" $(test -f "$OUT/run/checkpoints/last.pt" && echo --resume)

# 3. Every image's features, side by side; the neighbours of one real lens, by name
"$HL" embed --checkpoint "$OUT/run/checkpoints/last.pt" --data "$OUT/sims" "$OUT/desi" "$OUT/dolphin" "$OUT/aegis" \
    --out "$OUT/mixed.h5" --table "$OUT/mixed.csv"
"$HL" similar --embeddings "$OUT/mixed.h5" --key DESIJ1537+1443 -k 8 --out "$OUT/neighbours.png" \
    --table "$OUT/neighbours.csv"

# 4. theta_E: fine-tune on the labelled simulations (2 seeds), predict the real lenses with uncertainties
"$HL" finetune --backbone none --arch resnet18 --train "$OUT/sims" --test "$OUT/sims" --n-train 1000 --n-test 200 \
    --epochs 12 --seeds 0,1 --json "$OUT/ft.json" --save-model "$OUT/theta_E.safetensors"
"$HL" predict --model "$OUT"/theta_E.seed{0,1}.safetensors --data "$OUT/desi" --out "$OUT/desi_theta_E.csv"
