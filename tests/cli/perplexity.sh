#!/usr/bin/env bash
# End-to-end CLI test of `moe perplexity`: its perplexity equals one computed independently (in
# Python, from `moe logits` on the same token chunks); a model against itself has KL 0 and full
# top-1 agreement; q8_0 weights (quantized at load, and from a q8_0 .gguf that `moe quantize`
# wrote) have a small, non-zero KL; bad input gets clean errors.
# usage: bash perplexity.sh <moe binary> <fixtures dir>   (run by ctest as cli_perplexity)
set -u

MOE="${1:?usage: perplexity.sh <moe binary> <fixtures dir>}"
command -v python3 >/dev/null || { echo "SKIPPED: python3 not found"; exit 77; }

source "$(dirname "${BASH_SOURCE[0]}")/lib/harness.bash"
json_field() { grep '^{' <<<"${OUT}" | tail -n 1 | python3 -c "import json,sys; print(json.load(sys.stdin)['$1'])"; }
check() {  # description, python boolean expression
  if python3 -c "import sys; sys.exit(0 if ($2) else 1)"; then pass "$1"; else fail "$1 ($2)"; fi
}

run init "${MOE}" init --arch mixtral --preset tiny --tokenizer byte --seed 3 --out m
expect_ok init
TEXT="In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God said, Let there be light: and there was light."
printf '%s' "${TEXT}" > text.txt
CTX=64

# 1. The perplexity equals exp(mean next-token NLL) computed from `moe logits` on the same chunks.
run tokenize "${MOE}" tokenize m --text "${TEXT}" --no-special-tokens
expect_ok tokenize
printf '%s' "${OUT}" | grep '^\[' > ids.json
python3 - "${CTX}" <<'EOF' || fail "writing input_ids"
import json, struct, sys
ctx = int(sys.argv[1])
ids = json.load(open("ids.json"))
n = len(ids) // ctx
rows = ids[: n * ctx]
hdr = json.dumps({"input_ids": {"dtype": "I32", "shape": [n, ctx], "data_offsets": [0, 4 * len(rows)]}}).encode()
with open("ids.safetensors", "wb") as f:
    f.write(struct.pack("<Q", len(hdr)) + hdr + struct.pack("<%di" % len(rows), *rows))
EOF
run logits "${MOE}" logits m --input ids.safetensors --out logits.safetensors
expect_ok logits
python3 - "${CTX}" > want_ppl.txt <<'EOF' || fail "independent perplexity"
import json, math, struct, sys
ctx = int(sys.argv[1])
ids = json.load(open("ids.json"))
raw = open("logits.safetensors", "rb").read()
hl = struct.unpack("<Q", raw[:8])[0]
meta = json.loads(raw[8 : 8 + hl])["logits"]
b, s, v = meta["shape"]
beg, end = meta["data_offsets"]
lg = struct.unpack("<%df" % (b * s * v), raw[8 + hl + beg : 8 + hl + end])
nll, n = 0.0, 0
for r in range(b):
    for i in range(s - 1):
        row = lg[(r * s + i) * v : (r * s + i + 1) * v]
        mx = max(row)
        lse = mx + math.log(sum(math.exp(x - mx) for x in row))
        nll += lse - row[ids[r * ctx + i + 1]]
        n += 1
print(math.exp(nll / n), n)
EOF
read -r WANT_PPL WANT_N < want_ppl.txt
run ppl "${MOE}" perplexity m --file text.txt --ctx "${CTX}" --json
expect_ok "perplexity"
GOT_PPL="$(json_field perplexity)"
GOT_N="$(json_field tokens)"
check "perplexity ${GOT_PPL} equals the independent ${WANT_PPL} (1e-6)" "abs(${GOT_PPL} - ${WANT_PPL}) <= 1e-6 * ${WANT_PPL}"
check "scored tokens ${GOT_N} = ${WANT_N}" "${GOT_N} == ${WANT_N}"

# 2. Against itself: KL exactly 0, every top-1 agrees, the same perplexity twice.
run self "${MOE}" perplexity m --file text.txt --ctx "${CTX}" --kl-base m --json
expect_ok "perplexity --kl-base self"
check "self KL is 0" "$(json_field kl_mean) == 0 and $(json_field kl_max) == 0"
check "self top-1 agreement is 1" "$(json_field top1_agreement) == 1"
check "self base perplexity = perplexity" "$(json_field base_perplexity) == $(json_field perplexity)"

# 3. q8_0 weights, quantized at load and from a q8_0 GGUF: small but non-zero KL.
run q8 "${MOE}" perplexity m --file text.txt --ctx "${CTX}" --weights q8_0 --kl-base m --json
expect_ok "perplexity --weights q8_0"
KL_Q8="$(json_field kl_mean)"
check "q8_0 KL ${KL_Q8} in (0, 1e-3]" "0 < ${KL_Q8} <= 1e-3"
check "q8_0 top-1 agreement >= 0.9" "$(json_field top1_agreement) >= 0.9"
run quantize "${MOE}" quantize m --type q8_0 --out m.gguf --quiet
expect_ok "quantize q8_0"
run gguf "${MOE}" perplexity m.gguf --tokenizer m --file text.txt --ctx "${CTX}" --kl-base m --json
expect_ok "perplexity on a .gguf"
check "q8_0 GGUF KL $(json_field kl_mean) in (0, 1e-3]" "0 < $(json_field kl_mean) <= 1e-3"
PPL_TOK_DIR="$(json_field perplexity)"
# The GGUF carries the directory's tokenizer: the same text, the same perplexity without --tokenizer.
run gguf_own_tok "${MOE}" perplexity m.gguf --file text.txt --ctx "${CTX}" --kl-base m --json
expect_ok "perplexity on a .gguf with its own tokenizer"
check "the GGUF's tokenizer gives the same perplexity ($(json_field perplexity) vs ${PPL_TOK_DIR})" "$(json_field perplexity) == ${PPL_TOK_DIR}"

# 4. Bad input.
run quantize_nt "${MOE}" quantize m --type q8_0 --no-tokenizer --out m-nt.gguf --quiet
expect_ok "quantize without the tokenizer"
run no_tok "${MOE}" perplexity m-nt.gguf --file text.txt --ctx "${CTX}"
expect_err "a .gguf without a tokenizer" "give --tokenizer"
printf 'short' > short.txt
run short "${MOE}" perplexity m --file short.txt --ctx 64
expect_err "text shorter than one chunk" "fewer than one chunk"
run missing "${MOE}" perplexity m --file nope.txt
expect_err "missing text file" "nope.txt"
run ctx "${MOE}" perplexity m --file text.txt --ctx 1000000
expect_err "ctx above the model's positions" "above the model's limit"

finish
