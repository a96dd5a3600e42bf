#!/usr/bin/env bash
# The figures of docs/real_images.md: a deliberately tiny run (2-core CPU, minutes), so the
# picture shows the mechanics, not a science result. Run from the repository root:
#   bash docs/real_images/demo.sh [WORKDIR]
set -euo pipefail
W=${1:-/tmp/real_images_demo}
EUCLID=${EUCLID:-../shared/data/euclid_q1/102020532_NEG589257492489565961.fits}  # the Euclid Q1 cutout
H=.venv/bin/hpc-lensiam
D=docs/real_images
mkdir -p "$W"
printf 'instrument:\n  num_pix: 64\n' > "$W/grid64.yaml"
# pretraining pairs and the simulated reference set, both on the euclid grid (0.1"/px), 64 px
$H simulate --out "$W/pairs" --pairs 512 --shard-size 64 --preset euclid --config "$W/grid64.yaml" --seed 0
$H simulate --out "$W/sims" --pairs 400 --shard-size 100 --preset euclid --samples single --physics "$W/grid64.yaml" --seed 1
$H train --data "$W/pairs" --out "$W/run" --arch resnet18 --batch-size 32 --max-steps 21 --epochs 10 \
    --workers 0 --proj-dim 256 --pred-dim 64 --warmup-epochs 0 --no-zero-init-residual --log-every 20
# the real lens onto the same grid, labelled as a lens
printf 'file,is_lens\n%s,1\n' "$(basename $EUCLID)" > "$W/labels.csv"
# --preview draws it as `show` would (asinh stretch by default, softened by the image's noise)
$H ingest "$EUCLID" --out "$W/euclid_q1" --preset euclid --num-pix 64 --labels "$W/labels.csv" \
    --preview $D/euclid_q1_ingested.png
$H show "$W/euclid_q1" --out "$W/euclid_q1_linear.png" -n 1 --stretch linear   # the old picture, for comparison
CKPT="$W/run/checkpoints/last.pt"
$H embed --checkpoint "$CKPT" --data "$W/sims" --out "$W/sims.h5" --workers 0
$H embed --checkpoint "$CKPT" --data "$W/euclid_q1" --out "$W/real.h5" --workers 0
$H umap --embeddings "$W/sims.h5" --overlay "$W/real.h5" --out $D/umap_overlay.png --color theta_E,gamma \
    --coords "$W/umap.csv"
$H embed --checkpoint "$CKPT" --data "$W/sims" "$W/euclid_q1" --out "$W/mixed.h5" --workers 0
# by the object's name (the file stem): unique across the two folders, so no --data-dir
$H similar --embeddings "$W/mixed.h5" --key "$(basename "$EUCLID" .fits)" -k 11 \
    --out $D/euclid_q1_neighbours.png --json "$W/neighbours.json" --table "$W/neighbours.csv"
$H similar --embeddings "$W/mixed.h5" --image "$EUCLID" --checkpoint "$CKPT" -k 3
$H similar --embeddings "$W/mixed.h5" --anomaly -k 5 --top 6 --out $D/anomalies.png --json "$W/anomaly.json" --table "$W/anomaly.csv"
