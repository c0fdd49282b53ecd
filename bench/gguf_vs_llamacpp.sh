#!/usr/bin/env bash
# gguf_vs_llamacpp.sh — our CPU decode and prefill against llama.cpp's on the same GGUF files, in
# the same run: a random Mixtral-shaped model (moe init; --preset, default medium) is written as
# each GGUF type (moe quantize), then `moe bench decode|prefill --model FILE` and llama.cpp's own
# library (tests/gguf/llama_ref bench: its default settings, f16 KV cache) time the same file:
# decode tg (tokens/s over --tokens steps after a short prompt) and prefill pp (one batch of --seq
# tokens). Prints one table with the ratios (ours / llama.cpp) and the machine's CPU flags.
# usage: bash bench/gguf_vs_llamacpp.sh [BUILD_DIR] [PRESET] [TYPES...]
#   defaults: build, medium, q8_0 q4_0 q4_k_m bf16; also any type `moe quantize --type` writes,
#   and q2_k q3_k_m iq4_nl iq4_xs, which llama.cpp's quantizer makes from our bf16 file. Run on a quiet machine; THREADS (default:
#   nproc) threads for both engines. Each engine runs with its own thread-pool defaults: llama.cpp
#   spins its pool between ops; ours is libgomp, left at its default wait policy (spin briefly,
#   then sleep). OMP_WAIT_POLICY=passive (sleep at once) cost our decode 30-65% on this 2-core
#   VM — it wakes the workers ~130 times per token — and is not what a user runs.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD="${1:-${REPO}/build}"
PRESET="${2:-medium}"
shift $(( $# > 2 ? 2 : $# )) || true
TYPES=("${@:-q8_0 q4_0 q4_k_m bf16}")
read -r -a TYPES <<<"${TYPES[*]}"
THREADS="${THREADS:-$(nproc)}"
TG=128 PP=512 REPS=3
best() { python3 -c 'import sys; print(max(float(sys.argv[1]), float(sys.argv[2])))' "$1" "$2"; }
export OMP_NUM_THREADS="${THREADS}"
MOE="${BUILD}/moe"
[[ -x "${MOE}" ]] || { echo "no ${MOE}: build first" >&2; exit 1; }
bash "${REPO}/tests/gguf/setup.sh" "${BUILD}/gguf-ref" >&2
# shellcheck disable=SC1091
source "${BUILD}/gguf-ref/env"
export LLAMA_REF_LIBDIR

# Types our quantizer does not write (read-only, core/dtype.h): llama.cpp's ftype numbers.
declare -A LLAMA_FTYPE=([q2_k]=10 [q3_k_m]=12 [iq4_nl]=25 [iq4_xs]=30)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/moe-gguf-bench.XXXXXX")"
trap 'rm -rf "${WORK}"' EXIT
"${MOE}" init --arch mixtral --preset "${PRESET}" --seed 1 --out "${WORK}/model" >/dev/null
echo "CPU: $(lscpu | sed -n 's/^Model name: *//p'); flags: $(grep -o -w -E 'avx2|avx512f|avx512_vnni|avx512_bf16|amx_bf16|amx_int8' /proc/cpuinfo | sort -u | tr '\n' ' ')"
echo "model: mixtral/${PRESET} (random weights), threads ${THREADS}, decode ${TG} tokens, prefill ${PP} tokens, best of ${REPS} alternating rounds"
printf '%-8s %12s %12s %7s %12s %12s %7s\n' type "ours tg/s" "llama tg/s" ratio "ours pp/s" "llama pp/s" ratio
for t in "${TYPES[@]}"; do
  f="${WORK}/m-${t}.gguf"
  if [[ -n "${LLAMA_FTYPE[${t}]:-}" ]]; then
    # A type only llama.cpp writes: its quantizer on our bf16 file.
    [[ -f "${WORK}/m-src-bf16.gguf" ]] || "${MOE}" quantize "${WORK}/model" --type bf16 --out "${WORK}/m-src-bf16.gguf" --quiet >/dev/null
    "${LLAMA_REF}" quantize "${WORK}/m-src-bf16.gguf" "${f}" "${LLAMA_FTYPE[${t}]}" >/dev/null 2>&1
    dt=()
  else
    "${MOE}" quantize "${WORK}/model" --type "${t}" --out "${f}" --quiet >/dev/null
    label="${t}"; [[ "${t}" == q4_k_m ]] && label=q4_k
    dt=(--dtype "${label}")
  fi
  # Rounds alternate the two engines (ours, then llama.cpp's, then ours again...) and each side's
  # best round is reported: this shared VM's memory bandwidth drifts by +-30% over minutes, and
  # timing one engine's repetitions back to back and then the other's compared different machines.
  ours_tg=0 ours_pp=0 llama_tg=0 llama_pp=0
  for _ in $(seq 1 "${REPS}"); do
    v=$("${MOE}" bench decode --model "${f}" "${dt[@]}" --tokens "${TG}" --prompt 16 --reps 1 --json 2>/dev/null |
        python3 -c 'import json,sys; print([json.loads(l) for l in sys.stdin if l.startswith("{")][-1]["tokens_per_s"])')
    ours_tg=$(best "${ours_tg}" "${v}")
    v=$("${MOE}" bench prefill --model "${f}" "${dt[@]}" --batch 1 --seq "${PP}" --reps 1 --json 2>/dev/null |
        python3 -c 'import json,sys; print([json.loads(l) for l in sys.stdin if l.startswith("{")][-1]["tokens_per_s"])')
    ours_pp=$(best "${ours_pp}" "${v}")
    theirs=$("${LLAMA_REF}" bench "${f}" "${PP}" "${TG}" 1 "${THREADS}")
    llama_pp=$(best "${llama_pp}" "$(sed -n 's/^pp [0-9]*: \([0-9.]*\) tok\/s/\1/p' <<<"${theirs}")")
    llama_tg=$(best "${llama_tg}" "$(sed -n 's/^tg [0-9]*: \([0-9.]*\) tok\/s/\1/p' <<<"${theirs}")")
  done
  python3 - "${t}" "${ours_tg}" "${llama_tg}" "${ours_pp}" "${llama_pp}" <<'PY'
import sys
t, otg, ltg, opp, lpp = sys.argv[1], *map(float, sys.argv[2:])
print(f"{t:8s} {otg:12.2f} {ltg:12.2f} {otg / ltg:6.2f}x {opp:12.2f} {lpp:12.2f} {opp / lpp:6.2f}x")
PY
done
