#!/usr/bin/env bash
# End-to-end CLI test: init a tiny Mixtral model, inspect it, generate from it, and check
# that bad input paths are clean errors (non-zero exit, message naming the path), not crashes.
# usage: bash init_generate.sh <moe binary> <fixtures dir>   (run by ctest as cli_init_generate)
set -u

MOE="${1:?usage: init_generate.sh <moe binary> <fixtures dir>}"
FIXTURES="${2:-}"
: "${FIXTURES}"  # unused here; part of the common CLI-test signature

if [[ ! -x "${MOE}" ]]; then
  echo "FAIL: moe binary '${MOE}' is not executable"
  exit 1
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/moe-cli-test.XXXXXX")" || { echo "FAIL: mktemp"; exit 1; }
trap 'rm -rf "${WORK}"' EXIT
cd "${WORK}" || exit 1

FAILS=0
fail() { echo "FAIL: $*"; FAILS=$((FAILS + 1)); }
pass() { echo "ok:   $*"; }

# run NAME CMD... : runs CMD, stores combined output in OUT and exit status in RC.
# A status >= 128 means a signal (crash, sanitizer abort): always a failure.
run() {
  local name="$1"; shift
  echo "---- ${name}: $*"
  OUT="$("$@" 2>&1)"
  RC=$?
  printf '%s\n' "${OUT}" | sed 's/^/     | /' | head -n 40
  if ((RC >= 128)); then
    fail "${name}: killed by signal $((RC - 128)) (crash?)"
  fi
}

# 1. init
run init "${MOE}" init --arch mixtral --preset tiny --seed 3 --out d
if ((RC == 0)); then pass "init exits 0"; else fail "init exited ${RC}"; fi
if [[ -f d/config.json ]]; then pass "d/config.json exists"; else fail "d/config.json missing"; fi
if [[ -f d/model.safetensors ]]; then pass "d/model.safetensors exists"; else fail "d/model.safetensors missing"; fi

# 2. inspect
run inspect "${MOE}" inspect d
if ((RC == 0)); then pass "inspect exits 0"; else fail "inspect exited ${RC}"; fi
if grep -qi "experts" <<<"${OUT}"; then pass "inspect mentions experts"; else fail "inspect output does not mention 'experts'"; fi

# 3. generate
run generate "${MOE}" generate d --ids 1,2,3 --max-new-tokens 5 --seed 1
if ((RC == 0)); then pass "generate exits 0"; else fail "generate exited ${RC}"; fi
if grep -q "tokens/s" <<<"${OUT}"; then pass "generate prints tokens/s"; else fail "generate output lacks 'tokens/s'"; fi

# 4. errors: a missing model directory
run inspect-missing "${MOE}" inspect /nonexistent
if ((RC != 0)); then pass "inspect /nonexistent exits non-zero (${RC})"; else fail "inspect /nonexistent exited 0"; fi
if grep -q "/nonexistent" <<<"${OUT}"; then pass "error names the path"; else fail "error message does not name '/nonexistent'"; fi

# 5. errors: a missing input file for logits; nothing may be written to the output path
run logits-missing "${MOE}" logits d --input /nonexistent.safetensors --out x.safetensors
if ((RC != 0)); then pass "logits with missing --input exits non-zero (${RC})"; else fail "logits with missing --input exited 0"; fi
if [[ ! -e x.safetensors ]]; then pass "no output file written"; else fail "x.safetensors written despite the error"; fi

echo "----"
if ((FAILS > 0)); then
  echo "init_generate: ${FAILS} check(s) failed"
  exit 1
fi
echo "init_generate: all checks passed"
exit 0
