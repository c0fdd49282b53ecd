#!/usr/bin/env bash
# Fine-tuning benchmark: `moe bench finetune` against the eager PyTorch + PEFT-style peer
# (../shared/reference/torch_moe_baseline.py --mode lora) on the same weights, batch, sequence
# and LoRA targets (r 16, alpha 16), in the same run, for the small preset and a Mixtral-shaped
# 2-layer model (see train_vs_torch.sh, which runs each case):
#   attn      LoRA on q/k/v/o
#   experts   LoRA on q/k/v/o and every expert's w1/w2/w3
#   qlora     the same with the base's projections stored NF4 (the peer: its LoRA, f32 base —
#             it has no 4-bit path; bitsandbytes is not in Debian)
# Targets: training memory overhead <= 0.5x the peer's, tokens/s >= 2x. Reported, never asserted.
# Usage: bench/finetune_vs_torch.sh [OUT_DIR]   (env as train_vs_torch.sh: MOE, THREADS, STEPS, DTYPE, ROUNDS)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${1:-$ROOT/bench/results/finetune-$(date -u +%F)}"
ATTN=q_proj,k_proj,v_proj,o_proj
MODE=lora TARGETS="$ATTN" "$ROOT/bench/train_vs_torch.sh" "$OUT/attn"
MODE=lora TARGETS="$ATTN,w1,w2,w3" "$ROOT/bench/train_vs_torch.sh" "$OUT/experts"
MODE=lora TARGETS="$ATTN,w1,w2,w3" MOE_ARGS="--load-in-4bit ${MOE_ARGS:-}" "$ROOT/bench/train_vs_torch.sh" "$OUT/qlora"
for c in attn experts qlora; do
  echo "== $c"
  cat "$OUT/$c/summary.txt"
done | tee "$OUT/summary.txt"
