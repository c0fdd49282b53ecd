#!/usr/bin/env bash
# End-to-end `moe train` on a tiny model and a synthetic corpus:
#  - the validation loss falls below 60% of its initial value (39% after 40 steps);
#  - the aux load-balancing loss, and separately the aux-loss-free bias balancing, lower the
#    coefficient of variation of per-expert load compared with no balancing at all (same seed,
#    same data);
#  - a capacity factor drops tokens (counted per layer in metrics.jsonl) and still trains;
#  - the checkpoint loads in `moe generate`; `moe report` writes the HTML report;
#  - bad input: malformed JSONL (line number named), empty corpus, sequence length over the
#    model's limit, a diverging run (NaN/Inf loss: clear stop, last good checkpoint kept).
# usage: train_e2e.sh MOE_BINARY FIXTURES_DIR
set -euo pipefail
MOE="$1"
T="$(mktemp -d)"
trap 'rm -rf "$T"' EXIT
fail() { echo "FAIL: $*" >&2; exit 1; }

"$MOE" init --arch mixtral --preset tiny --tokenizer byte --seed 3 --out "$T/m" >/dev/null

# A corpus with structure to learn: sentences from a small grammar, deterministic.
python3 - "$T/corpus.txt" <<'EOF'
import random, sys
random.seed(7)
subj = ["the king", "a shepherd", "the people", "my brother", "the prophet", "a stranger"]
verb = ["went up to", "spake unto", "looked upon", "came down from", "gave bread to", "blessed"]
obj = ["the city", "the mountain", "the temple", "his house", "the river", "the land of the east"]
with open(sys.argv[1], "w") as f:
    for i in range(6000):
        f.write(f"And {random.choice(subj)} {random.choice(verb)} {random.choice(obj)}.\n")
EOF

COMMON=(--data "$T/corpus.txt" --steps 40 --batch-size 8 --seq-len 64 --lr 3e-3 --warmup 5 --seed 1
        --eval-every 20 --eval-batches 4 --quiet)
"$MOE" train "$T/m" "${COMMON[@]}" --out "$T/off" --aux-coef 0
"$MOE" train "$T/m" "${COMMON[@]}" --out "$T/on" --aux-coef 0.5
"$MOE" train "$T/m" "${COMMON[@]}" --out "$T/bias" --aux-coef 0 --bias-balance 0.01
CAP=(--data "$T/corpus.txt" --steps 10 --batch-size 8 --seq-len 64 --lr 3e-3 --seed 1 --eval-batches 2 --quiet)
"$MOE" train "$T/m" "${CAP[@]}" --out "$T/cap" --aux-coef 0 --capacity-factor 1.0

python3 - "$T" <<'EOF'
import json, sys
t = sys.argv[1]
def rows(run):
    return [json.loads(l) for l in open(f"{t}/{run}/metrics.jsonl") if l.strip()]
def mean_cv(run):  # mean over the last 20 steps and all MoE layers
    rs = rows(run)[-20:]
    return sum(sum(r["load_cv"]) / len(r["load_cv"]) for r in rs) / len(rs)
off, on, bias = mean_cv("off"), mean_cv("on"), mean_cv("bias")
print(f"load CV (last 20 steps): no balancing {off:.3f}, aux 0.5 {on:.3f}, bias balancing 0.01 {bias:.3f}")
assert on < off, f"aux loss did not lower the load CV: {on} >= {off}"
assert bias < off, f"bias balancing did not lower the load CV: {bias} >= {off}"
assert all(d == 0 for r in rows("on") for d in r["dropped"]), "dropless routing dropped tokens"
cap = rows("cap")
dropped = sum(sum(r["dropped"]) for r in cap)
routed = sum(sum(map(sum, r["expert_load"])) for r in cap)
print(f"capacity factor 1.0: {dropped} of {routed} assignments dropped")
assert 0 < dropped < routed, "capacity factor 1.0 on an unbalanced router must drop some assignments"
assert all(r["loss"] == r["loss"] for r in cap), "loss is NaN with a capacity factor"
v0 = json.load(open(f"{t}/on/train_config.json"))["initial_val_loss"]
v = [r["val_loss"] for r in rows("on") if "val_loss" in r][-1]
print(f"validation loss {v0:.3f} -> {v:.3f} ({100 * v / v0:.0f}%)")
assert v < 0.6 * v0, "validation loss did not fall below 60% of its initial value"
r = rows("on")[-1]
for k in ["step", "loss", "loss_ce", "aux_loss", "lr", "tokens_per_s", "expert_load", "load_cv"]:
    assert k in r, f"metrics.jsonl lacks {k}"
assert len(r["expert_load"]) == 2 and len(r["expert_load"][0]) == 8
assert sum(r["expert_load"][0]) == 8 * 64 * 2, "every token goes to exactly top-2 experts"
EOF

"$MOE" generate "$T/on/final" --prompt "And the king" --max-new-tokens 16 >"$T/gen.txt" || fail "generate from the checkpoint"
"$MOE" generate "$T/bias/final" --prompt "And the king" --max-new-tokens 4 >/dev/null ||
  fail "generate from a checkpoint with router selection biases"
"$MOE" report "$T/on" >/dev/null || fail "moe report"
grep -q "<svg" "$T/on/report.html" || fail "report has no SVG chart"

expect_error() {  # expect_error PATTERN CMD...
  local pat="$1"; shift
  if "$@" >"$T/out.txt" 2>"$T/err.txt"; then fail "expected an error from: $*"; fi
  grep -q -- "$pat" "$T/err.txt" || { cat "$T/err.txt" >&2; fail "error message lacks '$pat'"; }
}
printf '{"text": "fine"}\n{"text": broken\n' >"$T/bad.jsonl"
expect_error "bad.jsonl:2" "$MOE" train "$T/m" --data "$T/bad.jsonl" --out "$T/bad1" --steps 1 --quiet
: >"$T/empty.txt"
expect_error "empty" "$MOE" train "$T/m" --data "$T/empty.txt" --out "$T/bad2" --steps 1 --quiet
expect_error "limit" "$MOE" train "$T/m" --data "$T/corpus.txt" --out "$T/bad3" --steps 1 --seq-len 5000 --quiet
# Divergence: a learning rate that overflows the f32 weights makes the loss non-finite (at
# lr 1e6 the loss only reaches ~1e13: the attention backward renormalises in f64 and stays
# finite); the run stops with a clear message and the last checkpoint written before it stays
# loadable.
expect_error "not finite\|NaN\|Inf" "$MOE" train "$T/m" --data "$T/corpus.txt" --out "$T/nan" --steps 40 \
  --batch-size 4 --seq-len 32 --lr 1e38 --clip 0 --save-every 1 --val-fraction 0 --quiet
last=$(ls -d "$T"/nan/step-* 2>/dev/null | sort -t- -k2 -n | tail -1)
[[ -n "$last" ]] || fail "no checkpoint kept before the divergence"
"$MOE" inspect "$last" >/dev/null || fail "last good checkpoint $last does not load"
echo "train_e2e: ok"
