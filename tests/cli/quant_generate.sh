#!/usr/bin/env bash
# End-to-end CLI test of quantized CPU inference: `moe generate/logits --weights q8_0|q4_0|...`
# on the mixtral fixture (projections quantized at load, integer kernels), `moe bench decode
# --dtype q8_0` on the tiny preset, and clean errors for what is not supported.
# usage: bash quant_generate.sh <moe binary> <fixtures dir>   (run by ctest as cli_quant_generate)
set -u

MOE="${1:?usage: quant_generate.sh <moe binary> <fixtures dir>}"
FIXTURES="${2:?usage: quant_generate.sh <moe binary> <fixtures dir>}"
MODEL="${FIXTURES}/mixtral"
if [[ ! -d "${MODEL}" ]]; then
  echo "SKIPPED: fixture ${MODEL} not found"
  exit 77
fi

source "$(dirname "${BASH_SOURCE[0]}")/lib/harness.bash"

run f32 "${MOE}" generate "${MODEL}" --ids 1,5,9 --max-new-tokens 6
expect_ok "generate f32"
F32_TOKENS="$(grep '^generated:' <<<"${OUT}")"
[[ -n "${F32_TOKENS}" ]] || fail "generate f32 printed no 'generated:' line"
for w in q8_0 q4_0 q4_k q6_k; do
  run "${w}" "${MOE}" generate "${MODEL}" --ids 1,5,9 --max-new-tokens 6 --weights "${w}"
  expect_ok "generate --weights ${w}"
  grep -q "^weights ${w} (kernels " <<<"${OUT}" && pass "${w}: kernels named" || fail "${w}: no 'weights ${w} (kernels ...)' line"
  grep -q "quantized-weights" <<<"${OUT}" && pass "${w}: quantized-weights in the memory report" ||
    fail "${w}: no quantized-weights category in the memory report"
done
run q8_0_tokens "${MOE}" generate "${MODEL}" --ids 1,5,9 --max-new-tokens 6 --weights q8_0
[[ "$(grep '^generated:' <<<"${OUT}")" == "${F32_TOKENS}" ]] && pass "q8_0 greedy tokens equal f32's" ||
  fail "q8_0 greedy tokens differ from f32's: ${F32_TOKENS}"
for isa in avx2 avx512 avx512vnni; do
  MOE_QUANT_ISA="${isa}" run "isa_${isa}" "${MOE}" generate "${MODEL}" --ids 1,5,9 --max-new-tokens 6 --weights q8_0
  if grep -q "does not support" <<<"${OUT}"; then
    pass "MOE_QUANT_ISA=${isa}: refused on this CPU"
  else
    [[ "$(grep '^generated:' <<<"${OUT}")" == "${F32_TOKENS}" ]] && pass "MOE_QUANT_ISA=${isa}: same tokens" ||
      fail "MOE_QUANT_ISA=${isa}: tokens differ"
  fi
done

run logits "${MOE}" logits "${MODEL}" --input "${MODEL}/batch.safetensors" --out l.safetensors --weights q4_0
expect_ok "logits --weights q4_0"
[[ -s l.safetensors ]] && pass "logits file written" || fail "logits file missing"

run bad_weights "${MOE}" generate "${MODEL}" --ids 1,2 --weights q3_k
expect_err "--weights q3_k" "weights"
run cuda_weights "${MOE}" generate "${MODEL}" --ids 1,2 --weights q8_0 --device cuda
expect_err "--weights q8_0 --device cuda" "cuda"
MOE_QUANT_ISA=sse2 run bad_isa "${MOE}" generate "${MODEL}" --ids 1,2 --weights q8_0
expect_err "MOE_QUANT_ISA=sse2" "MOE_QUANT_ISA"

run bench "${MOE}" bench decode --preset tiny --dtype q8_0 --tokens 4 --reps 1 --json
expect_ok "bench decode --dtype q8_0"
grep -q "read-only bandwidth" <<<"${OUT}" && pass "bench: read roofline reported" || fail "bench: no read-only bandwidth line"
grep -qE "each rep against the read bandwidth measured just before and after it: [0-9.]+-[0-9.]+%" <<<"${OUT}" \
  && pass "bench: per-rep roofline ratios reported" || fail "bench: no per-rep roofline line"
grep -q '"weight_bytes_per_token"' <<<"${OUT}" && pass "bench: bytes/token in the JSON" || fail "bench: no weight_bytes_per_token"
grep -qE "kernels on cache-resident rows \(no memory wait\): .*q8_0 [0-9]+\.[0-9]" <<<"${OUT}" \
  && pass "bench: the q8_0 kernel's own rate reported" || fail "bench: no kernel roofline line for q8_0"
grep -qE '"roofline_kernel_bytes_per_s":[1-9]' <<<"${OUT}" && pass "bench: kernel roofline in the JSON" || fail "bench: no roofline_kernel_bytes_per_s"
grep -qE "over the [0-9.]+ MB a token reads whole .* -> [0-9.]+ GB/s for a token's [0-9.]+ MB: [0-9.]+% of it" <<<"${OUT}" \
  && pass "bench: the hot bytes' read rate in the roofline" || fail "bench: no hot-bytes roofline"
# The mix's roofline: never below the memory's read rate (the hot bytes' share read at least as fast).
python3 -c 'import json,sys; j=[json.loads(l) for l in sys.stdin if l.startswith("{")][-1]; sys.exit(0 if j["roofline_read_mix_bytes_per_s"] >= j["roofline_read_bytes_per_s"] > 0 else 1)' <<<"${OUT}" \
  && pass "bench: mix roofline >= read roofline" || fail "bench: mix roofline below the read roofline"

finish
