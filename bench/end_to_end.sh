#!/usr/bin/env bash
# The large-data path end to end on this machine: simulate (sample shards) -> codecs -> tokenize (token shards) ->
# streamed training, at two sizes, each step under GNU time: wall time and the peak resident memory of the command
# and its children. Memory must not grow with the number of galaxies.
#
#   bash bench/end_to_end.sh [OUT_DIR] [SIZES...]        # default: /tmp/mmfm-e2e 10000 100000
#
# 100 000 galaxies take about 5 GB of disk and, on 2 cores, tens of minutes per step.
set -u
OUT=${1:-/tmp/mmfm-e2e}; shift || true
SIZES=${*:-10000 100000}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
M=${MMFM:-$ROOT/.venv/bin/mmfm}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$OUT" && cd "$OUT"
step() { name=$1; shift; echo "== $name: $*"; /usr/bin/time -v "$@" > "$name.out" 2> "$name.time";
         echo "rc=$? $(grep -E 'Elapsed|Maximum resident' "$name.time" | tr '\n' ' ')"; tail -2 "$name.out"; }
for n in $SIZES; do
  step "sim$n" $M simulate --out "sims$n" --n "$n" --shards --shard-size 1000 --workers 2 --quiet
done
first=$(echo $SIZES | cut -d' ' -f1)
# a rerun keeps the codecs it fitted (mmfm codecs never replaces a saved manager: tokens made with it would be orphaned)
[ -f codecs/codecs.json ] || step codecs $M codecs --data "sims$first" --out codecs --sources legacy_image hsc_image legacy_catalog spec_z \
     --max-samples 2000 --epochs 5 --patch legacy=4 hsc=6 --table-bins 64
for n in $SIZES; do
  step "tok$n" $M tokenize --data "sims$n" --codecs codecs --out "tokens$n" --workers 2 --quiet
  step "train$n" $M train --data "tokens$n" --codecs codecs --out "run$n" --preset tiny --steps 300 --batch-size 64 \
       --input-budget 64 --target-budget 64 --eval-every 0 --checkpoint-every 100 --no-progress
done
