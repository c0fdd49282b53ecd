#!/usr/bin/env bash
# Build MoE Engine (Release, into build/) and run the main job: train a small Mixtral-style MoE
# from scratch on the King James Bible (public domain, from Debian's bible-kjv packages) for a
# few minutes on the CPU, watch the loss fall and the experts stay balanced, write the HTML
# report, then generate text from the trained model.
# The CUDA backend is compiled when nvcc is found (it runs only where a GPU is present).
# Override with MOE_CUDA=ON|OFF; MOE_DEMO_STEPS=N changes the training length (default 200).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PATH="/usr/local/cuda/bin:${PATH}"
if [[ -z "${MOE_CUDA:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then MOE_CUDA=ON; else MOE_CUDA=OFF; fi
fi
CMAKE_ARGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DMOE_CUDA="${MOE_CUDA}" -DMOE_TESTS=OFF)
if [[ "${MOE_CUDA}" == "ON" ]]; then
  CMAKE_ARGS+=(-DCMAKE_CUDA_COMPILER="$(command -v nvcc)")
fi

echo "== run_main: configure (build/, Release, MOE_CUDA=${MOE_CUDA})"
cmake -S . -B build "${CMAKE_ARGS[@]}"
echo "== run_main: build the moe CLI"
cmake --build build --target moe -j "$(nproc)"

STEPS="${MOE_DEMO_STEPS:-200}"
MODEL=out/kjv-small
RUN=out/kjv-run
mkdir -p out
echo "== run_main: corpus (King James Bible, one verse per line)"
bash scripts/kjv_corpus.sh out/kjv.txt

echo "== run_main: a small Mixtral-style MoE (4 layers, 8 experts, top-2, ~20M parameters, byte-level tokenizer)"
rm -rf "${MODEL}" "${RUN}"
build/moe init --arch mixtral --preset small --tokenizer byte --seed 1 --out "${MODEL}"

echo "== run_main: train ${STEPS} steps of 8 x 128 tokens (AdamW, cosine schedule, aux load-balancing loss 0.1)"
build/moe train "${MODEL}" --data out/kjv.txt --out "${RUN}" --steps "${STEPS}" --batch-size 8 --seq-len 128 \
  --lr 2e-3 --warmup 10 --weight-decay 0.01 --aux-coef 0.1 --eval-every 50 --eval-batches 8 --log-every 10 \
  --save-every 100

echo "== run_main: summary"
python3 - "${RUN}/metrics.jsonl" "${RUN}/train_config.json" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
v0 = json.load(open(sys.argv[2]))["initial_val_loss"]
val = [(r["step"], r["val_loss"]) for r in rows if "val_loss" in r]
first, last = rows[0], rows[-1]
print(f"train loss: step 1 {first['loss_ce']:.3f} -> step {last['step']} {last['loss_ce']:.3f}")
print("validation loss: " + ", ".join(f"step {s}: {v:.3f}" for s, v in val))
ratio = val[-1][1] / v0
print(f"validation loss {v0:.3f} before training -> {val[-1][1]:.3f}: {100 * ratio:.0f}% of the initial value")
cv = last["load_cv"]
print("expert load, last step (coefficient of variation per layer): " + ", ".join(f"{c:.2f}" for c in cv))
EOF

echo "== run_main: report"
build/moe report "${RUN}"

echo "== run_main: generate from the trained model"
build/moe generate "${RUN}/final" --prompt "And God said" --max-new-tokens 80 --temperature 0.7 --top-k 40 --seed 1
