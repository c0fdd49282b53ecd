#!/usr/bin/env bash
# Training benchmark: `moe bench train` against the eager PyTorch peer
# (../shared/reference/torch_moe_baseline.py --mode full) on the SAME weights, batch and
# sequence, in the same run, for
#   (a) the small mixtral preset (written by `moe init`), and
#   (b) a Mixtral-shaped 2-layer model (hidden 512, ffn 1792, 8 experts top-2, 8/2 heads,
#       vocab 32000) written by the torch script's --random-model.
# Prints tokens/s and training-memory-overhead ratios (targets: >= 2x and <= 0.5x), the
# expert-GEMM share of the sgemm peak, the E=8 vs E=32 activation peaks, and the BLAS torch found.
#
# Usage: bench/train_vs_torch.sh [OUT_DIR]      (env: MOE=path/to/moe, THREADS=2, STEPS=3,
#        MOE_ARGS="extra moe bench train flags", e.g. the memory-lean step the peer's loop matches
#        (it does not clip): MOE_ARGS="--clip 0 --fused-update --optimizer-dtype bf16")
# Fine-tuning (bench/finetune_vs_torch.sh sets these): MODE=lora TARGETS=q_proj,k_proj,...
#        runs `moe bench finetune --target-modules TARGETS` against the peer's --mode lora with the
#        same targets, r 16, alpha 16 (MOE_ARGS=--load-in-4bit: QLoRA against the same peer).
# DTYPE=bf16: our steps on bf16 weights (`--weight-dtype bf16`: mixed precision on f32 master
#        weights; fine-tuning `--base-dtype bf16`), products on the CPU's bf16 matrix units where
#        it has them; the peer runs twice, `--dtype bfloat16` and float32, and the ratios are
#        against the faster of the two (its bf16 run is pure bf16: weights and AdamW in bf16).
# Thread settings, each program with its best: the torch peer runs with OMP_WAIT_POLICY=passive
# (PEER_OMP_WAIT_POLICY): its libgomp threads, spinning, fight its own OpenBLAS pthread pool for
# the cores — unset, the peer ran 2.5x slower on 2 cores, a crippled baseline
# (bench/results/train-2026-12-02-c). Our engine has one pool (libgomp, OpenBLAS-openmp) and runs
# with libgomp's default policy (MOE_OMP_WAIT_POLICY to override): passive made it 5-13% slower
# on the small preset, as every short parallel region then wakes sleeping threads.
# ROUNDS=N (default 1): each case runs N alternated rounds (ours, then the peer's) and each side
#        is reported by its fastest round, every round's tokens/s listed beside it: on a shared VM
#        a program's speed moves 10-30% between minutes, and alternating keeps one slow minute from
#        deciding a ratio.
# Needs bench/setup_torch.sh once (python3-torch, python3-numpy, pthread OpenBLAS).
# Never fails on time: the numbers are reported, not asserted.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MOE="${MOE:-$ROOT/build/moe}"
OUT="${1:-$ROOT/bench/results/train-$(date -u +%F)}"
THREADS="${THREADS:-2}"
STEPS="${STEPS:-3}"
ROUNDS="${ROUNDS:-1}"
MODE="${MODE:-full}"
DTYPE="${DTYPE:-f32}"
TARGETS="${TARGETS:-q_proj,k_proj,v_proj,o_proj}"
if [[ "$MODE" == lora ]]; then
  MOE_BENCH=(finetune --target-modules "$TARGETS" --lora-r 16 --lora-alpha 16 --base-dtype "$DTYPE")
  PEER_MODE=(--mode lora --target-modules "$TARGETS" --lora-r 16 --lora-alpha 16)
else
  MOE_BENCH=(train --weight-dtype "$DTYPE")
  PEER_MODE=(--mode full)
fi
case "$DTYPE" in
  f32) PEER_DTYPES=(float32) ;;
  bf16) PEER_DTYPES=(bfloat16 float32) ;;
  *) echo "train_vs_torch: DTYPE must be f32 or bf16" >&2; exit 1 ;;
esac
TORCH_PY="${TORCH_PY:-$ROOT/../shared/reference/torch_moe_baseline.py}"
FIXTURE_LIKE="${FIXTURE_LIKE:-$ROOT/../shared/fixtures/mixtral}"
PY=/usr/bin/python3

[[ -x "$MOE" ]] || { echo "train_vs_torch: $MOE not built (set MOE=...)" >&2; exit 1; }
[[ -f "$TORCH_PY" ]] || { echo "train_vs_torch: $TORCH_PY not found" >&2; exit 1; }
"$PY" -c 'import torch' 2>/dev/null || { echo "train_vs_torch: no torch for $PY: run bench/setup_torch.sh" >&2; exit 1; }
mkdir -p "$OUT"
WORK="$(mktemp -d /tmp/moe-train-bench-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
export OMP_NUM_THREADS="$THREADS"
unset OMP_WAIT_POLICY
PEER_OMP_WAIT_POLICY="${PEER_OMP_WAIT_POLICY:-passive}"
MOE_ENV=()
[[ -n "${MOE_OMP_WAIT_POLICY:-}" ]] && MOE_ENV=("OMP_WAIT_POLICY=$MOE_OMP_WAIT_POLICY")

note_load() {  # the machine's load next to every measurement: > cores means a shared, noisy machine
  echo "# $(date -u +%FT%TZ) uptime:$(uptime | sed 's/.*load average/ load average/') (cores: $(nproc))" \
    "OMP_WAIT_POLICY: moe ${MOE_OMP_WAIT_POLICY:-default}, peer ${PEER_OMP_WAIT_POLICY}"
}

# run_case NAME MODEL_DIR BATCH SEQ [extra moe args...]: ROUNDS alternated rounds; round r > 1
# logs to NAME-moe-rR.log, NAME-torch-rR.log, NAME-torch-f32-rR.log.
run_case() {
  local name="$1" dir="$2" batch="$3" seq="$4"
  shift 4
  echo "== $name: batch $batch x seq $seq, $STEPS timed steps after 1 warm-up, $THREADS threads, $ROUNDS round(s)"
  local round sfx pdt log
  for ((round = 1; round <= ROUNDS; round++)); do
    sfx=""
    ((round > 1)) && sfx="-r$round"
    { note_load; echo "\$ moe bench ${MOE_BENCH[*]} --model $dir --batch $batch --seq $seq --steps $STEPS --warmup-steps 1 --json $* ${MOE_ARGS:-}"; } \
      > "$OUT/$name-moe$sfx.log"
    # shellcheck disable=SC2086  # MOE_ARGS is a list of flags
    env "${MOE_ENV[@]}" "$MOE" bench "${MOE_BENCH[@]}" --model "$dir" --batch "$batch" --seq "$seq" --steps "$STEPS" --warmup-steps 1 --json "$@" ${MOE_ARGS:-} \
      >> "$OUT/$name-moe$sfx.log" 2>&1
    note_load >> "$OUT/$name-moe$sfx.log"
    for pdt in "${PEER_DTYPES[@]}"; do
      log="$OUT/$name-torch$sfx.log"
      [[ "$pdt" == float32 && ${#PEER_DTYPES[@]} -gt 1 ]] && log="$OUT/$name-torch-f32$sfx.log"
      { note_load; echo "\$ torch_moe_baseline.py ${PEER_MODE[*]} --dtype $pdt --model $dir --batch $batch --seq $seq --steps $STEPS --threads $THREADS --json"; } \
        > "$log"
      OMP_WAIT_POLICY="$PEER_OMP_WAIT_POLICY" "$PY" "$TORCH_PY" "${PEER_MODE[@]}" --dtype "$pdt" --model "$dir" --batch "$batch" --seq "$seq" --steps "$STEPS" --warmup 1 \
        --threads "$THREADS" --json >> "$log" 2>&1
      note_load >> "$log"
    done
  done
}

# (a) the small preset, as `moe init` writes it (f32)
"$MOE" init --arch mixtral --preset small --dtype f32 --out "$WORK/small" > /dev/null
SWEEP=()
[[ "$MODE" == lora ]] || SWEEP=(--act-sweep 8,32)  # activation growth with E: a training-bench question
run_case small "$WORK/small" 4 256 "${SWEEP[@]}"

# (b) Mixtral-shaped, 2 layers
"$PY" "$TORCH_PY" --random-model "$WORK/mixtral2l" --like "$FIXTURE_LIKE" --hidden 512 --layers 2 --experts 8 \
  --topk 2 --ffn 1792 --vocab 32000 --heads 8 --kv-heads 2 > "$OUT/mixtral2l-init.log" 2>&1
cp "$WORK/mixtral2l/config.json" "$OUT/mixtral2l-config.json"
run_case mixtral2l "$WORK/mixtral2l" 4 256 "${SWEEP[@]}"

"$PY" - "$OUT" "$ROUNDS" <<'PY' | tee "$OUT/summary.txt"
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def one_json(path):
    for line in reversed(open(path).read().splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    raise SystemExit(f"{path}: no JSON line (see the log)")
def last_json(path):
    """The fastest of the rounds' results for one log name (path, path-r2, ...); all rounds' tok/s kept in it."""
    runs = [one_json(path if r == 1 else path[:-4] + f"-r{r}.log") for r in range(1, rounds + 1)]
    best = max(runs, key=lambda j: j["tokens_per_s"])
    best["round_tokens_per_s"] = [j["tokens_per_s"] for j in runs]
    return best
mib = 2 ** 20
print(f"{'case':<10} {'moe tok/s':>10} {'torch tok/s':>11} {'ratio':>6} (>=2) | {'moe ovh MiB':>11} {'torch ovh MiB':>13} "
      f"{'ratio':>6} (<=0.5) | {'expert GEMM % peak':>18} (>=50) | act E8->E32")
blas = set()
import os
for name in ("small", "mixtral2l"):
    m, t = last_json(f"{out}/{name}-moe.log"), last_json(f"{out}/{name}-torch.log")
    peer_note = f"peer {t.get('dtype', 'float32')}"
    if os.path.exists(f"{out}/{name}-torch-f32.log"):  # DTYPE=bf16: the faster of the peer's two runs
        t32 = last_json(f"{out}/{name}-torch-f32.log")
        peer_note = (f"peer bfloat16 {t['tokens_per_s']:.1f} tok/s {t['peak_rss_increase_bytes'] / mib:.1f} MiB, "
                     f"float32 {t32['tokens_per_s']:.1f} tok/s {t32['peak_rss_increase_bytes'] / mib:.1f} MiB: ratios "
                     f"against the faster")
        if t32["tokens_per_s"] > t["tokens_per_s"]:
            t = t32
    blas.add(f"{t['blas']} -> {t['blas_lib']} ({t['gemm_gflops_f32']} GFLOP/s f32 1024^3), torch {t['torch']}")
    sweep = m.get("act_sweep", [])
    act = (f"x{sweep[-1]['activations_peak_bytes'] / sweep[0]['activations_peak_bytes']:.3f}" if len(sweep) >= 2 else "-")
    print(f"{name:<10} {m['tokens_per_s']:>10.1f} {t['tokens_per_s']:>11.1f} {m['tokens_per_s'] / t['tokens_per_s']:>6.2f}       | "
          f"{m['peak_rss_increase_bytes'] / mib:>11.1f} {t['peak_rss_increase_bytes'] / mib:>13.1f} "
          f"{m['peak_rss_increase_bytes'] / t['peak_rss_increase_bytes']:>6.2f}         | "
          f"{100 * m['expert_fraction_of_peak']:>17.1f}%       | {act}")
    print(f"{'':<10} moe: sgemm peak {m['sgemm_peak_flops'] / 1e9:.1f} GFLOP/s, expert GEMMs {m['expert_flops_per_s'] / 1e9:.1f} "
          f"GFLOP/s ({100 * m['expert_fraction_of_step']:.0f}% of the step); activations {m['activations_peak_bytes'] / mib:.1f} MiB "
          f"measured vs {m['activations_layout_bytes'] / mib:.1f} MiB layout; peaks " +
          ", ".join(f"{k} {v / mib:.1f}" for k, v in m["mem_peak_bytes"].items()) + " MiB")
    print(f"{'':<10} moe weights {m.get('weight_dtype', 'f32')}{' (bf16 matrix units)' if m.get('bf16_matrix') else ''}; {peer_note}")
    if rounds > 1:
        print(f"{'':<10} rounds (fastest reported): moe " + " ".join(f"{x:.1f}" for x in m["round_tokens_per_s"]) +
              f" | peer {t.get('dtype', 'float32')} " + " ".join(f"{x:.1f}" for x in t["round_tokens_per_s"]) + " tok/s")
    print(f"{'':<10} losses moe {' '.join(f'{x:.4f}' for x in m['losses'])} | torch {' '.join(f'{x:.4f}' for x in t['losses'])}")
    if "model_flops_per_step" in m:
        # Whole-step utilisation: the same model FLOPs (planner count) over each step time, against
        # the sgemm peak measured in moe's run. 2x the peer's tokens/s means doing these FLOPs at
        # twice the peer's utilisation: above ~90% of the best large sgemm is out of reach for a
        # step that also holds small GEMMs, softmaxes, norms and the optimizer's memory traffic.
        fl, pk = m["model_flops_per_step"], m["sgemm_peak_flops"]
        tstep = m["batch"] * m["seq"] / t["tokens_per_s"]
        mstep = m["batch"] * m["seq"] / m["tokens_per_s"]
        print(f"{'':<10} model FLOPs {fl / 1e9:.1f} GFLOP/step: moe {100 * fl / mstep / pk:.1f}% of the "
              f"sgemm peak, torch {100 * fl / tstep / pk:.1f}%; 2x torch needs {200 * fl / tstep / pk:.1f}%")
for b in sorted(blas):
    print("torch BLAS:", b)
PY
echo "logs in $OUT"
