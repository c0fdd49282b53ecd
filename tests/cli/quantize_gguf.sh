#!/usr/bin/env bash
# End-to-end CLI test of `moe quantize`: each --type writes a GGUF file whose summary names the
# types it holds, progress goes to stderr, and bad input (unknown type, missing model, a GGUF
# path as the model) is a clean error that writes nothing. The directory's tokenizer travels in
# the file: `moe tokenize` / `generate` / `inspect` read it from the .gguf; a file without one
# says so.
# usage: bash quantize_gguf.sh <moe binary> <fixtures dir>   (run by ctest as cli_quantize_gguf)
set -u

MOE="${1:?usage: quantize_gguf.sh <moe binary> <fixtures dir>}"
FIXTURES="${2:?usage: quantize_gguf.sh <moe binary> <fixtures dir>}"

if [[ ! -x "${MOE}" ]]; then
  echo "FAIL: moe binary '${MOE}' is not executable"
  exit 1
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/moe-cli-quantize.XXXXXX")" || { echo "FAIL: mktemp"; exit 1; }
trap 'rm -rf "${WORK}"' EXIT
cd "${WORK}" || exit 1

FAILS=0
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
pass() { echo "ok:   $*"; }

run() {
  local name="$1"; shift
  echo "---- ${name}: $*"
  OUT="$("$@" 2>err.txt)"
  RC=$?
  ERR="$(cat err.txt)"
  printf '%s\n' "${OUT}" | sed 's/^/     | /' | head -n 20
  if ((RC >= 128)); then
    fail "${name}: killed by signal $((RC - 128)) (crash?)"
  fi
}

for t in f32 f16 bf16 q8_0 q4_0 q4_k_m q5_k_m q6_k; do
  run "quantize ${t}" "${MOE}" quantize "${FIXTURES}/qwen2_moe" --type "${t}" --out "m-${t}.gguf"
  if ((RC == 0)) && [[ -s "m-${t}.gguf" ]]; then pass "${t}: exits 0 and writes the file"; else fail "${t}: exit ${RC}"; fi
  if grep -q "wrote m-${t}.gguf: ${t}" <<<"${OUT}"; then pass "${t}: summary"; else fail "${t}: no summary line"; fi
  if grep -q "blk.1.ffn_down_exps.weight" <<<"${ERR}"; then pass "${t}: per-tensor progress on stderr"; else fail "${t}: no progress"; fi
done
# The GGUF magic, and a q8_0 file is about a quarter of the f32 one.
if [[ "$(head -c 4 m-q8_0.gguf)" == "GGUF" ]]; then pass "GGUF magic"; else fail "no GGUF magic"; fi
S32=$(stat -c %s m-f32.gguf); S8=$(stat -c %s m-q8_0.gguf)
if ((S8 * 3 < S32)); then pass "q8_0 (${S8} B) < f32 (${S32} B) / 3"; else fail "q8_0 ${S8} B vs f32 ${S32} B"; fi

# A q4_k_m mix gives attn_v more bits than q/k (at this fixture's width: q8_0 against q5_0), so
# the three stay apart in their own types: the exact logits equal those of the same file read
# dequantized (one stacked f32 projection), and the fast kernels run on the split projections.
python3 - <<'PY' || fail "writing input_ids"
import json, struct
ids = [1, 5, 9, 14, 3, 27, 8]
data = struct.pack("<%di" % len(ids), *ids)
h = json.dumps({"input_ids": {"dtype": "I32", "shape": [1, len(ids)], "data_offsets": [0, len(data)]}}).encode()
open("ids.safetensors", "wb").write(struct.pack("<Q", len(h)) + h + data)
PY
run inspect-mix "${MOE}" inspect m-q4_k_m.gguf
if grep -q "q5_0" <<<"${OUT}" && grep -q "q8_0" <<<"${OUT}"; then pass "q4_k_m mixes q5_0 and q8_0 here"; else fail "types: ${OUT}"; fi
run logits-mix "${MOE}" logits m-q4_k_m.gguf --input ids.safetensors --out mix.safetensors
run logits-deq "${MOE}" logits m-q4_k_m.gguf --input ids.safetensors --out deq.safetensors --dtype f32
run logits-fast "${MOE}" logits m-q4_k_m.gguf --input ids.safetensors --out fast.safetensors --fast
python3 - <<'PY' && pass "q4_k_m: split q/k/v logits equal the dequantized file's (exact), fast within 5%" || fail "q4_k_m split q/k/v logits"
import array, json, struct, sys
def load(p):
    b = open(p, "rb").read(); n = struct.unpack("<Q", b[:8])[0]; h = json.loads(b[8:8 + n]); d = {}
    for k, v in h.items():
        if k == "__metadata__": continue
        s, e = v["data_offsets"]; a = array.array("f"); a.frombytes(b[8 + n + s:8 + n + e]); d[k] = a
    return d
mix, deq, fast = load("mix.safetensors"), load("deq.safetensors"), load("fast.safetensors")
ok = True
for k in deq:
    scale = max(abs(v) for v in deq[k])
    exact = max(abs(a - b) for a, b in zip(mix[k], deq[k])) / scale
    fst = max(abs(a - b) for a, b in zip(fast[k], deq[k])) / scale
    if not (exact <= 1e-5 and fst <= 5e-2):
        print("%s: exact %.2e, fast %.2e" % (k, exact, fst)); ok = False
sys.exit(0 if ok else 1)
PY

# The tokenizer inside the file (the byte-level tokenizer of a model trained from scratch).
run init "${MOE}" init --arch mixtral --preset tiny --tokenizer byte --seed 1 --out mb
run quantize-tok "${MOE}" quantize mb --type q8_0 --out mb.gguf --quiet
if grep -q "tokenizer: gpt2 / gpt-2, 257 tokens" <<<"${OUT}"; then pass "the tokenizer is written"; else fail "no tokenizer line"; fi
TEXT='And the king <|endoftext|> went up é'
run tok-dir "${MOE}" tokenize mb --text "${TEXT}"
DIR_IDS="${OUT}"
run tok-gguf "${MOE}" tokenize mb.gguf --text "${TEXT}"
if ((RC == 0)) && [[ -n "${DIR_IDS}" && "${OUT}" == "${DIR_IDS}" ]]; then pass "the .gguf tokenizes as the directory"; else fail "ids differ: ${OUT} vs ${DIR_IDS}"; fi
run inspect-tok "${MOE}" inspect mb.gguf
if grep -q "^tokenizer  *gpt2 / gpt-2, 257 tokens" <<<"${OUT}" && grep -q "q8_0" <<<"${OUT}"; then pass "inspect shows the tokenizer and types"; else fail "inspect output"; fi
run gen-gguf "${MOE}" generate mb.gguf --prompt "And the" --max-new-tokens 4
if ((RC == 0)) && grep -q "^prompt:" <<<"${OUT}"; then pass "generate --prompt on a .gguf"; else fail "generate on a .gguf: rc ${RC}: ${ERR}"; fi
# A directory without a tokenizer: the file says "none", and reading one from it names the file.
if grep -q "tokenizer: not written" <<< "$("${MOE}" quantize "${FIXTURES}/qwen2_moe" --type f32 --out nt.gguf --quiet 2>&1)"; then
  pass "no tokenizer: said so"; else fail "no 'not written' line"; fi
run tok-none "${MOE}" tokenize nt.gguf --text "hi"
if ((RC != 0)) && grep -q "nt.gguf.*carries no tokenizer" <<<"${ERR}"; then pass "a .gguf without a tokenizer: clean error"; else fail "tok-none: rc ${RC}: ${ERR}"; fi

# --type nf4: a bitsandbytes 4-bit model directory the engine loads with its NF4 weights in place.
run nf4 "${MOE}" quantize "${FIXTURES}/qwen3_moe" --type nf4 --out q3-nf4 --quiet
if ((RC == 0)) && grep -q "bitsandbytes nf4 with double quantization" <<<"${OUT}" && [[ -f q3-nf4/model.safetensors ]]; then
  pass "nf4: a bitsandbytes directory"; else fail "nf4: rc ${RC}: ${ERR}"; fi
run nf4-inspect "${MOE}" inspect q3-nf4
if ((RC == 0)) && grep -q "bitsandbytes nf4: 56 weights" <<<"${OUT}"; then pass "inspect reads the packed weights"; else fail "nf4 inspect: rc ${RC}: ${ERR}"; fi
run nf4-gen "${MOE}" generate q3-nf4 --ids 1,2,3 --max-new-tokens 4
if ((RC == 0)) && grep -q "quantized-weights" <<<"${OUT}${ERR}"; then pass "generate on the nf4 directory"; else fail "nf4 generate: rc ${RC}: ${ERR}"; fi
run nf4-again "${MOE}" quantize "${FIXTURES}/qwen3_moe" --type nf4 --out q3-nf4 --quiet
if ((RC != 0)) && grep -q "already exists" <<<"${ERR}"; then pass "nf4: an existing directory is refused"; else fail "nf4 over an existing dir: rc ${RC}"; fi

run bad-type "${MOE}" quantize "${FIXTURES}/mixtral" --type q3_k --out bad.gguf
if ((RC != 0)) && grep -q "q3_k" <<<"${ERR}"; then pass "unknown --type is an error naming it"; else fail "bad type: rc ${RC}: ${ERR}"; fi
if [[ ! -e bad.gguf ]]; then pass "nothing written"; else fail "bad.gguf written"; fi

run missing "${MOE}" quantize /nonexistent --type q8_0 --out bad.gguf
if ((RC != 0)) && grep -q "/nonexistent" <<<"${ERR}"; then pass "missing model is an error naming it"; else fail "missing: rc ${RC}"; fi
if [[ -z "$(ls bad.gguf* 2>/dev/null)" ]]; then pass "no file or temp file left"; else fail "left $(ls bad.gguf*)"; fi

echo "----"
if ((FAILS > 0)); then
  echo "quantize_gguf: ${FAILS} check(s) failed"
  exit 1
fi
echo "quantize_gguf: all checks passed"
exit 0
