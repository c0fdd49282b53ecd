#!/usr/bin/env bash
# End-to-end test of `moe report`: writes a synthetic RUN_DIR/metrics.jsonl (80 steps, 2 MoE layers
# of 8 experts, validation every 10 steps), generates the report through the CLI, opens it in
# headless Chromium (Debian's chromium package) and checks that the charts are in the rendered
# DOM; also takes a screenshot (kept at $MOE_REPORT_SCREENSHOT when that is set). Bad input must
# be a clean error naming the file and line, leaving no report behind.
# Without chromium: FAIL under CI=true (scripts/install_deps.sh installs it), else SKIPPED (exit 77,
# which ctest reports as skipped).
# usage: bash report_chromium.sh <moe binary> <fixtures dir>   (run by ctest as cli_report_chromium)
set -u

MOE="${1:?usage: report_chromium.sh <moe binary> <fixtures dir>}"
if [[ ! -x "${MOE}" ]]; then
  echo "FAIL: moe binary '${MOE}' is not executable"
  exit 1
fi
MOE="$(cd "$(dirname "${MOE}")" && pwd)/$(basename "${MOE}")"  # the test runs in a temp dir
CHROMIUM="${CHROMIUM:-/usr/bin/chromium}"
if [[ ! -x "${CHROMIUM}" ]]; then
  if [[ "${CI:-}" == "true" ]]; then
    echo "FAIL: ${CHROMIUM} not found (CI=true; scripts/install_deps.sh installs the chromium package)"
    exit 1
  fi
  echo "SKIPPED: ${CHROMIUM} not found (apt-get install chromium, or run scripts/install_deps.sh)"
  exit 77
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/moe-report-test.XXXXXX")" || { echo "FAIL: mktemp"; exit 1; }
trap 'rm -rf "${WORK}"' EXIT
cd "${WORK}" || exit 1

FAILS=0
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
pass() { echo "ok:   $*"; }

run() {
  local name="$1"; shift
  echo "---- ${name}: $*"
  OUT="$("$@" 2>&1)"
  RC=$?
  printf '%s\n' "${OUT}" | sed 's/^/     | /' | head -n 20
  if ((RC >= 128)); then
    fail "${name}: killed by signal $((RC - 128)) (crash?)"
  fi
}

# Headless Chromium with nothing that reaches the network or a desktop session.
chromium_run() {
  local profile
  profile="$(mktemp -d "${WORK}/profile.XXXXXX")"
  HOME="${WORK}" timeout 180 "${CHROMIUM}" --headless --no-sandbox --disable-gpu --disable-quic --no-first-run \
    --disable-background-networking --disable-component-update --disable-sync --disable-extensions \
    --user-data-dir="${profile}" "$@"
}

# 1. A synthetic run: loss falls, layer 0 starts imbalanced (expert 3 takes most tokens) and
#    balances, layer 1 stays uniform.
mkdir -p run
awk 'BEGIN {
  for (s = 0; s < 80; s++) {
    loss = 5.5 * exp(-s / 25) + 1.2;
    skew = (s < 50) ? (1 - s / 50) : 0;
    l0 = ""; l1 = "";
    for (e = 0; e < 8; e++) {
      n0 = int(64 + ((e == 3) ? 448 * skew : -64 * skew));
      l0 = l0 (e ? "," : "") n0;
      l1 = l1 (e ? "," : "") 64;
    }
    printf "{\"step\":%d,\"loss\":%.6f,\"loss_ce\":%.6f,\"aux_loss\":%.6f,\"z_loss\":0,\"lr\":%.8f,", s, loss + 0.02, loss, 1 + skew, 0.001 * (s < 10 ? (s + 1) / 10 : 1);
    printf "\"tokens_per_s\":%.1f,\"grad_norm\":%.4f,\"elapsed_s\":%.2f,", 4000 + 50 * sin(s), 2 * exp(-s / 40) + 0.2, s * 0.5;
    printf "\"expert_load\":[[%s],[%s]],\"load_cv\":[%.4f,0],\"load_max_mean\":[%.4f,1],\"dropped\":[0,0]", l0, l1, 2.6 * skew, 1 + 7 * skew;
    if (s % 10 == 9) printf ",\"val_loss\":%.6f", loss + 0.1;
    printf "}\n";
  }
}' >run/metrics.jsonl
printf '{"model_type":"mixtral","num_hidden_layers":2,"hidden_size":64,"num_local_experts":8,"num_experts_per_tok":2}\n' >run/config.json

run report "${MOE}" report run
if ((RC == 0)); then pass "report exits 0"; else fail "report exited ${RC}"; fi
if [[ -s run/report.html ]]; then pass "run/report.html written"; else fail "run/report.html missing"; fi
if grep -qx "run/report.html" <<<"${OUT}"; then pass "prints the path written"; else fail "did not print run/report.html"; fi

run report-out "${MOE}" report run --out custom.html
if ((RC == 0)) && [[ -s custom.html ]]; then pass "--out custom.html written"; else fail "--out custom.html (rc ${RC})"; fi

# 2. Rendered DOM.
echo "---- chromium --dump-dom"
chromium_run --dump-dom "file://${WORK}/run/report.html" >dom.html 2>chromium.log
RC=$?
if ((RC == 0)) && [[ -s dom.html ]]; then pass "chromium dumped the DOM ($(wc -c <dom.html) bytes)"; else
  fail "chromium --dump-dom failed (rc ${RC})"; sed 's/^/     | /' chromium.log | tail -n 20; fi
# Chromium's serialisation (not the file's text): the parser closed <head>, moved nothing.
if grep -q '<html lang="en"><head>' dom.html; then pass "DOM is Chromium's serialisation"; else fail "DOM does not look parsed by Chromium"; fi
for id in chart-loss chart-aux chart-lr chart-tokens chart-grad-norm chart-balance; do
  if grep -q "<svg id=\"${id}\"" dom.html; then pass "chart ${id} in the DOM"; else fail "chart ${id} missing from the DOM"; fi
done
N_HEAT=$(grep -o '<svg class="heatmap"[^>]*data-layer="[0-9]*"' dom.html | wc -l)
if ((N_HEAT == 2)); then pass "2 expert-load heatmaps (one per layer)"; else fail "expected 2 heatmaps, found ${N_HEAT}"; fi
for layer in 0 1; do
  if grep -q "data-layer=\"${layer}\" data-experts=\"8\"" dom.html; then pass "heatmap of layer ${layer} has 8 experts"; else fail "heatmap of layer ${layer}"; fi
done
if grep -q 'data-name="validation loss" data-points="8"' dom.html; then pass "validation loss series with 8 points"; else fail "validation loss series"; fi
if grep -q 'data-name="train loss" data-points="80"' dom.html; then pass "train loss series with 80 points"; else fail "train loss series"; fi
if grep -q 'id="summary"' dom.html && grep -q 'id="layer-summary"' dom.html; then pass "summary tables"; else fail "summary tables missing"; fi
if grep -qE '<(script|link)|src=' dom.html; then fail "the report loads something from outside"; else pass "no scripts, links or src attributes"; fi

# 3. Screenshot: the page renders to a non-trivial image.
echo "---- chromium --screenshot"
chromium_run --window-size=1400,2400 --hide-scrollbars --screenshot="${WORK}/shot.png" "file://${WORK}/run/report.html" \
  >>chromium.log 2>&1
if [[ -s shot.png ]] && (($(wc -c <shot.png) > 30000)); then pass "screenshot $(wc -c <shot.png) bytes"; else
  fail "screenshot missing or blank"; sed 's/^/     | /' chromium.log | tail -n 20; fi
if [[ -n "${MOE_REPORT_SCREENSHOT:-}" && -s shot.png ]]; then cp shot.png "${MOE_REPORT_SCREENSHOT}"; fi

# 4. Bad input: clean errors naming the file (and line), no report written.
mkdir -p bad
run missing "${MOE}" report nowhere
if ((RC != 0)) && grep -q "nowhere/metrics.jsonl" <<<"${OUT}"; then pass "missing run dir: error names metrics.jsonl"; else fail "missing run dir (rc ${RC})"; fi
: >bad/metrics.jsonl
run empty "${MOE}" report bad
if ((RC != 0)) && grep -q "empty" <<<"${OUT}"; then pass "empty metrics.jsonl is an error"; else fail "empty metrics.jsonl (rc ${RC})"; fi
printf '{"step":0,"loss":1}\n{"step":1,"loss":0.9}\n{"step":2,"loss":\n' >bad/metrics.jsonl
run malformed "${MOE}" report bad
if ((RC != 0)) && grep -q "bad/metrics.jsonl:3" <<<"${OUT}"; then pass "malformed line: error names line 3"; else fail "malformed line (rc ${RC})"; fi
if [[ ! -e bad/report.html ]]; then pass "no report written on error"; else fail "bad/report.html written despite errors"; fi
if ! ls bad | grep -q tmp; then pass "no temp file left"; else fail "temp file left in bad/"; fi

echo "----"
if ((FAILS > 0)); then
  echo "report_chromium: ${FAILS} check(s) failed"
  exit 1
fi
echo "report_chromium: all checks passed"
exit 0
