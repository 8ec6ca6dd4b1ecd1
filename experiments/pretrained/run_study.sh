#!/usr/bin/env bash
# The pretrained-encoder study in one command (CPU, 2 cores, ~4 hours): EfficientNet-Lite0 on CamVid at 90x120,
# batch 8, 400 iterations, validated every 100; ImageNet-pretrained (5 seeds) and from scratch (the contrast), then
# the design variants (shared encoder; coarse stride-32 logits with its own baseline and zero-offset control),
# the offset analysis near/away from boundaries, the tables and the plot. Checkpoints go to runs/ (git-ignored).
#   bash experiments/pretrained/run_study.sh [SEEDS...]        (default 304 305 306 307 308)
# On a GPU: add --device cuda --jobs 4 and drop --threads/--max-load (and train.amp=bf16 if wanted).
set -euo pipefail
cd "$(dirname "$0")/../.."
SEEDS=("${@:-304 305 306 307 308}")
DATA=${DATA:-../shared/data/camvid}
COMMON=(--data-root "$DATA" --device cpu --iters 400 --resolution 90 120 --batch 8 --jobs 2 --max-load 1.6
        --threads 1 --out experiments/pretrained/runs model.bn_momentum=0.1)
export OMP_NUM_THREADS=1
python experiments/camvid/study.py --study pretrained --seeds ${SEEDS[@]} "${COMMON[@]}" \
    --results experiments/pretrained/study_pretrained
python experiments/camvid/study.py --study pretrained_scratch --seeds ${SEEDS[@]} "${COMMON[@]}" \
    --results experiments/pretrained/study_scratch
python experiments/camvid/study.py --study pretrained_design --seeds ${SEEDS[@]} "${COMMON[@]}" \
    --results experiments/pretrained/study_design
python experiments/pretrained/regions.py experiments/pretrained/runs experiments/pretrained/study_pretrained \
    experiments/pretrained/study_scratch --data-root "$DATA"
python experiments/pretrained/stats.py experiments/pretrained/study_pretrained experiments/pretrained/study_scratch \
    experiments/pretrained/study_design --out experiments/pretrained/stats --plot experiments/pretrained/study.png
