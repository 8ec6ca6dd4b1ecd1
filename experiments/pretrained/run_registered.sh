#!/usr/bin/env bash
# The registered study (issue 26) in one command: the pretrained EfficientNet-Lite0 study again, with the resizes
# registered to the encoder's receptive-field centres and the weights' own input normalisation (the recipes'
# defaults: nothing here pins the old ones), and controls that tell alignment from detail. Same protocol as
# run_study.sh (CamVid 90x120, batch 8, 400 iterations, validated every 100, BN momentum 0.1, paired seeds):
#   coarse head (model.head=coarse), seeds 304-308: baseline, OVeNet, zero-offset, step-size (semantic loss x2),
#     content-free (seeds moved by a field of pixel coordinates only);
#   concat head (fcn), seeds 304-306: baseline, OVeNet, zero-offset, step-size.
# Then the tables (stats.py --registered): paired differences, the R^2 of a fixed per-position offset field, and
# the new numbers beside the old study's (study_design: coarse, study_pretrained: concat).
# Resumable over several sittings: a run whose JSON is in study_registered/ is skipped; commit the JSON as they
# land. The tables are rebuilt at the end of every sitting from whatever runs exist (seeds per arm shown).
#   bash experiments/pretrained/run_registered.sh [study.py options, e.g. --device cuda --jobs 4]
set -uo pipefail
cd "$(dirname "$0")/../.."
DATA=${DATA:-../shared/data/camvid}
RESULTS=${RESULTS:-experiments/pretrained/study_registered}
STATS=${STATS:-experiments/pretrained/stats_registered}
COMMON=(--data-root "$DATA" --device cpu --iters 400 --resolution 90 120 --batch 8 --jobs 2 --max-load 1.6
        --threads 1 --out experiments/pretrained/runs/registered --results "$RESULTS")
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
rc=0
python experiments/camvid/study.py --study registered --seeds 304 305 306 307 308 "${COMMON[@]}" "$@" \
    model.bn_momentum=0.1 || rc=$?
python experiments/camvid/study.py --study registered_concat --seeds 304 305 306 "${COMMON[@]}" "$@" \
    model.bn_momentum=0.1 || rc=$?
python experiments/pretrained/stats.py "$RESULTS" --registered \
    --old experiments/pretrained/study_design experiments/pretrained/study_pretrained \
    --out "$STATS" || rc=$?
exit $rc
