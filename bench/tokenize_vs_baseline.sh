#!/usr/bin/env bash
# Tokenizer encode speed of this tree against an earlier revision (issue 13: "tokenizer encode
# speed stays within 10% of today's" — today's being the revision before the hostile-input
# limits, eb179ce). Both revisions' src/tokenizer + src/core are compiled with the same flags
# into the same harness (bench/tokenize_harness.cpp: the corpus and timing loop of
# tokenizer_bench.cpp, unchanged between the two), then run alternately, REPS times each, on
# every real tokenizer the tokenizer tests installed; the best of each is compared.
# Usage: bench/tokenize_vs_baseline.sh [BASE_REV] (env: SECONDS_PER_RUN=2 REPS=3
#        TOKENIZERS=dir-of-tokenizer-dirs, default build/tokenizer-ref/tokenizers)
# Reports; never fails on speed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE="${1:-eb179ce}"
SECS="${SECONDS_PER_RUN:-2}"
REPS="${REPS:-3}"
TOKS="${TOKENIZERS:-$ROOT/build/tokenizer-ref/tokenizers}"
[[ -d "$TOKS" ]] || { echo "tokenize_vs_baseline: no tokenizers in $TOKS (run tests/tokenizer/setup.sh or the test suite)" >&2; exit 1; }
WORK="$(mktemp -d /tmp/moe-tok-bench-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/base" "$WORK/head"
git -C "$ROOT" archive "$BASE" src/core src/tokenizer | tar -x -C "$WORK/base"
cp -r "$ROOT/src" "$WORK/head/"
FLAGS=(-O3 -DNDEBUG -march=x86-64-v3 -fopenmp -std=gnu++20 -w)
build() {  # build DIR: the harness against DIR/src (core + tokenizer only)
  local d="$1" objs=()
  for f in "$d"/src/core/*.cpp "$d"/src/tokenizer/*.cpp; do
    case "$f" in */core/memory.cpp|*/core/tensor.cpp|*/core/quant.cpp|*/core/dtype.cpp) continue ;; esac
    g++ "${FLAGS[@]}" -I"$d/src" -c "$f" -o "$f.o" &
    objs+=("$f.o")
  done
  wait
  g++ "${FLAGS[@]}" -I"$d/src" "$ROOT/bench/tokenize_harness.cpp" "${objs[@]}" -o "$d/harness" -lsentencepiece
}
echo "== building $BASE and the working tree (src/core + src/tokenizer)"
build "$WORK/base"
build "$WORK/head"
echo "== $(date -u +%FT%TZ) load:$(uptime | sed 's/.*load average://') cores $(nproc); ${SECS}s per run, best of $REPS, alternating"
printf "%-14s %12s %12s %8s  %s\n" tokenizer "base MB/s" "head MB/s" "ratio" "tokens/MB base,head"
for t in "$TOKS"/*/; do
  name="$(basename "$t")"
  best_b=0; best_h=0; tb=0; th=0; bb=1; bh=1
  for ((i = 0; i < REPS; i++)); do
    read -r mb tk by < <("$WORK/base/harness" "$t" "$SECS")
    if awk "BEGIN{exit !($mb > $best_b)}"; then best_b=$mb; tb=$tk; bb=$by; fi
    read -r mb tk by < <("$WORK/head/harness" "$t" "$SECS")
    if awk "BEGIN{exit !($mb > $best_h)}"; then best_h=$mb; th=$tk; bh=$by; fi
  done
  awk -v n="$name" -v b="$best_b" -v h="$best_h" -v tb="$tb" -v th="$th" -v bb="$bb" -v bh="$bh" \
    'BEGIN{printf "%-14s %12.2f %12.2f %8.3f  %.0f,%.0f\n", n, b, h, h/b, tb/bb*1e6, th/bh*1e6}'
done
