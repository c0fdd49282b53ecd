# harness.bash — shared helpers of the CLI tests (sourced; outside the tests/cli/*.sh glob that
# ctest registers). After `source`, the caller is in a fresh work directory removed at exit.
#   fail MSG / pass MSG        count and print a check
#   run NAME CMD...            run CMD; OUT = its output (stdout+stderr), RC = its status; a
#                              status >= 128 (a signal: crash, sanitizer abort) always fails
#   expect_ok NAME             RC is 0
#   expect_err NAME TEXT       RC is a clean error (1..127) and OUT contains TEXT
#   finish                     exit 1 if any check failed
# MOE_TEST_SHOW_LINES (default 30): lines of each command's output echoed into the test log.

WORK="$(mktemp -d "${TMPDIR:-/tmp}/moe-cli-test.XXXXXX")" || { echo "FAIL: mktemp"; exit 1; }
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
  # (progress lines end in \r: shown one per line)
  printf '%s\n' "${OUT}" | tr '\r' '\n' | sed 's/^/     | /' | tail -n "${MOE_TEST_SHOW_LINES:-30}"
  if ((RC >= 128)); then fail "${name}: killed by signal $((RC - 128)) (crash?)"; fi
}
expect_ok() { if ((RC == 0)); then pass "$1 exits 0"; else fail "$1 exited ${RC}"; fi; }
expect_err() {
  if ((RC != 0 && RC < 128)) && grep -q -- "$2" <<<"${OUT}"; then pass "$1: clean error"; else fail "$1: expected an error naming '$2' (rc ${RC})"; fi
}
finish() {
  if ((FAILS)); then
    echo "${FAILS} check(s) failed"
    exit 1
  fi
  echo "all checks passed"
}
