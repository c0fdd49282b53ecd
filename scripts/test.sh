#!/usr/bin/env bash
# MoE Engine test command (README command 2; also what .ci/run calls). Three stages:
#   release  Release build (build-ci/) with -Werror, CUDA backend compiled when nvcc is
#            found (required under CI=true), then ctest: GoogleTest suites + CLI shell tests.
#            GPU tests report SKIPPED where no GPU is present.
#   asan     ASan+UBSan build (build-asan/, RelWithDebInfo, CPU only), then ctest.
#   fuzz     clang + libFuzzer build (build-fuzz/, ASan+UBSan) of every parser's target
#            (fuzz/fuzz_*.cpp), each run for MOE_FUZZ_SECONDS (25) from seeds that
#            scripts/fuzz_seeds.py derives from ../shared/fixtures, the real tokenizers (when
#            set up) and the regression corpus tests/fuzz_corpus/<target>/, with a per-input
#            timeout; a crash, sanitizer report, leak, hang (timeout) or OOM fails the stage.
# Environment knobs for local iteration:
#   MOE_SKIP_RELEASE=1 MOE_SKIP_ASAN=1 MOE_SKIP_FUZZ=1   skip a stage
#   MOE_CUDA=ON|OFF        force the CUDA backend on/off in the release stage (default: auto)
#   MOE_FUZZ_SECONDS=N     fuzzing time per target (default 25; 6 targets)
#   MOE_CTEST_TIMEOUT=N    per-test timeout in seconds (default 600)
# Exits non-zero on the first failing stage; the last line always summarises the stages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PATH="/usr/local/cuda/bin:${PATH}"
JOBS="$(nproc)"
FIXTURES_DIR="../shared/fixtures"
FUZZ_TARGETS=(safetensors_header safetensors_index config_json tokenizer_json jinja regex)
FUZZ_SECONDS="${MOE_FUZZ_SECONDS:-25}"
CTEST_TIMEOUT="${MOE_CTEST_TIMEOUT:-600}"

SUMMARY=()
CURRENT_STAGE=""
STAGE_T0=0
SCRIPT_T0="${SECONDS}"
TMP_DIRS=()

on_exit() {
  local rc=$?
  if [[ -n "${CURRENT_STAGE}" ]]; then
    SUMMARY+=("${CURRENT_STAGE} FAIL ($((SECONDS - STAGE_T0))s)")
  fi
  if ((${#TMP_DIRS[@]})); then rm -rf "${TMP_DIRS[@]}"; fi
  local joined
  joined="$(printf '%s, ' "${SUMMARY[@]}")"
  joined="${joined%, }"
  echo
  if [[ ${rc} -eq 0 ]]; then
    echo "test.sh: OK: ${joined}; total $((SECONDS - SCRIPT_T0))s"
  else
    echo "test.sh: FAILED (exit ${rc}): ${joined:-no stage finished}; total $((SECONDS - SCRIPT_T0))s"
  fi
}
trap on_exit EXIT

stage_begin() {  # stage_begin NAME DESCRIPTION
  CURRENT_STAGE="$1"
  STAGE_T0="${SECONDS}"
  echo
  echo "================================================================================"
  echo "== stage ${1}: ${2}"
  echo "================================================================================"
}

stage_end() {
  local dt=$((SECONDS - STAGE_T0))
  echo "== stage ${CURRENT_STAGE}: PASS in ${dt}s"
  SUMMARY+=("${CURRENT_STAGE} PASS (${dt}s)")
  CURRENT_STAGE=""
}

stage_skip() {  # stage_skip NAME VAR
  echo
  echo "== stage ${1}: SKIPPED (${2}=1)"
  SUMMARY+=("${1} SKIPPED")
}

# --- tool versions (cheap, and useful in CI logs) ---------------------------------------
echo "== test.sh in $(pwd) (CI=${CI:-}), ${JOBS} jobs"
echo "   $(cmake --version | head -n1); ninja $(ninja --version); $(g++ --version | head -n1)"

# --- stage: release ---------------------------------------------------------------------
if [[ "${MOE_SKIP_RELEASE:-0}" == "1" ]]; then
  stage_skip release MOE_SKIP_RELEASE
else
  cuda="${MOE_CUDA:-}"
  if [[ -z "${cuda}" ]]; then
    if command -v nvcc >/dev/null 2>&1; then
      cuda=ON
    elif [[ "${CI:-}" == "true" ]]; then
      echo "test.sh: CI=true but nvcc was not found (PATH, /usr/local/cuda/bin)." >&2
      echo "test.sh: CI must compile the CUDA backend every run; refusing to skip it." >&2
      exit 1
    else
      cuda=OFF
    fi
  fi
  cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DMOE_WERROR=ON -DMOE_CUDA="${cuda}")
  if [[ "${cuda}" == "ON" ]]; then
    cmake_args+=(-DCMAKE_CUDA_COMPILER="$(command -v nvcc)")
    echo "   $(nvcc --version | grep -i release)"
  fi
  stage_begin release "Release build (build-ci/, MOE_WERROR=ON, MOE_CUDA=${cuda}) + ctest"
  cmake -S . -B build-ci "${cmake_args[@]}"
  cmake --build build-ci -j "${JOBS}"
  ctest --test-dir build-ci --output-on-failure -j2 --no-tests=error --timeout "${CTEST_TIMEOUT}"
  stage_end
fi

# --- stage: asan ------------------------------------------------------------------------
if [[ "${MOE_SKIP_ASAN:-0}" == "1" ]]; then
  stage_skip asan MOE_SKIP_ASAN
else
  stage_begin asan "ASan+UBSan build (build-asan/, RelWithDebInfo, MOE_CUDA=OFF) + ctest"
  cmake -S . -B build-asan -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DMOE_SANITIZE=ON -DMOE_CUDA=OFF
  cmake --build build-asan -j "${JOBS}"
  # The llama.cpp comparison suites (GgufLlamaCpp.*) run in the release stage: their time goes to
  # the uninstrumented llama.cpp peer process, so under ASan they would add minutes and no checks.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    ctest --test-dir build-asan --output-on-failure -j2 --no-tests=error --timeout "${CTEST_TIMEOUT}" \
      -E '^GgufLlamaCpp\.'
  stage_end
fi

# --- stage: fuzz ------------------------------------------------------------------------
if [[ "${MOE_SKIP_FUZZ:-0}" == "1" ]]; then
  stage_skip fuzz MOE_SKIP_FUZZ
else
  stage_begin fuzz "libFuzzer build (build-fuzz/, clang) + ${FUZZ_SECONDS}s per target: ${FUZZ_TARGETS[*]}"
  echo "   $(clang++ --version | head -n1)"
  # MOE_SANITIZE=ON + fuzzer-no-link: moelib itself (not only the fuzz entry point) is
  # built with ASan/UBSan and libFuzzer coverage instrumentation.
  CC=clang CXX=clang++ cmake -S . -B build-fuzz -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
    -DMOE_FUZZ=ON -DMOE_TESTS=OFF -DMOE_CUDA=OFF -DMOE_SANITIZE=ON \
    -DCMAKE_CXX_FLAGS=-fsanitize=fuzzer-no-link
  cmake --build build-fuzz -j "${JOBS}" --target "${FUZZ_TARGETS[@]/#/fuzz_}"
  mkdir -p build-fuzz/artifacts
  # Real tokenizer files and chat templates for the seeds, where the release stage set them up.
  tokenizers=""
  for d in build-ci/tokenizer-ref/tokenizers build/tokenizer-ref/tokenizers; do
    if [[ -d "${d}" ]]; then tokenizers="${d}"; break; fi
  done
  for t in "${FUZZ_TARGETS[@]}"; do
    corpus="$(mktemp -d "${TMPDIR:-/tmp}/moe-fuzz-${t}.XXXXXX")"
    TMP_DIRS+=("${corpus}")
    python3 scripts/fuzz_seeds.py "${t}" "${corpus}" "${FIXTURES_DIR}" ${tokenizers:+"${tokenizers}"}
    echo "-- fuzz_${t}: ${FUZZ_SECONDS}s"
    # Crashing/hanging inputs are kept in build-fuzz/artifacts/ (reproduce: build-fuzz/fuzz_TARGET
    # FILE); add them to tests/fuzz_corpus/TARGET/ once fixed. -timeout flags hangs (per input).
    log="build-fuzz/fuzz_${t}.log"
    rc=0
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
      "build-fuzz/fuzz_${t}" "${corpus}" \
        -max_total_time="${FUZZ_SECONDS}" -max_len=65536 -timeout=10 -rss_limit_mb=2048 \
        -print_final_stats=1 -artifact_prefix="build-fuzz/artifacts/fuzz_${t}-" > "${log}" 2>&1 || rc=$?
    grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' "${log}" || true
    if [[ ${rc} -ne 0 ]]; then
      echo "test.sh: fuzz_${t} failed (exit ${rc}: crash, sanitizer report, timeout or OOM); see ${log}" \
           "and build-fuzz/artifacts/" >&2
      exit 1
    fi
  done
  stage_end
fi
