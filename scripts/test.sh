#!/usr/bin/env bash
# MoE Engine test command (README command 2; also what .ci/run calls). Three stages:
#   release  Release build (build-ci/) with -Werror, CUDA backend compiled when nvcc is
#            found (required under CI=true), then ctest: GoogleTest suites + CLI shell tests.
#            GPU tests report SKIPPED where no GPU is present.
#   asan     ONE clang build (build-asan/, RelWithDebInfo, CPU only, without MPI: Open MPI's own
#            allocations trip LeakSanitizer, and the multi-process tests ran in the release stage;
#            here they report SKIPPED) with ASan+UBSan (and libFuzzer
#            coverage instrumentation on the parsers) that serves both the ctest run and the fuzz
#            stage's libFuzzer targets (fuzz/fuzz_*.cpp): the library is compiled under the
#            sanitizers once, not twice; then ctest.
#   fuzz     every parser's target from build-asan/ (built there if the asan stage was skipped),
#            one per core at a time, each for MOE_FUZZ_SECONDS (25) from seeds that
#            scripts/fuzz_seeds.py derives from ../shared/fixtures, the real tokenizers (when set
#            up) and the regression corpus tests/fuzz_corpus/<target>/, with a per-input timeout;
#            a crash, sanitizer report, leak, hang (timeout) or OOM fails the stage.
# Environment knobs for local iteration:
#   MOE_SKIP_RELEASE=1 MOE_SKIP_ASAN=1 MOE_SKIP_FUZZ=1   skip a stage
#   MOE_CUDA=ON|OFF        force the CUDA backend on/off in the release stage (default: auto)
#   MOE_FUZZ_SECONDS=N     fuzzing time per target (default 25; 8 targets)
#   MOE_CTEST_TIMEOUT=N    per-test timeout in seconds (default 600)
#   MOE_RELEASE_DIR=D MOE_ASAN_DIR=D   build directories (default build-ci, build-asan)
# Exits non-zero on the first failing stage; the last line always summarises the stages.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PATH="/usr/local/cuda/bin:${PATH}"
JOBS="$(nproc)"
FIXTURES_DIR="../shared/fixtures"
FUZZ_TARGETS=(safetensors_header safetensors_index config_json tokenizer_json jinja regex gguf api_request)
FUZZ_SECONDS="${MOE_FUZZ_SECONDS:-25}"
CTEST_TIMEOUT="${MOE_CTEST_TIMEOUT:-600}"
RELEASE_DIR="${MOE_RELEASE_DIR:-build-ci}"
ASAN_DIR="${MOE_ASAN_DIR:-build-asan}"

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

# ctest, and when it fails a recap of the failed checks at the end of the log (where CI's excerpt of
# it looks): each failing test's "FAIL:" lines (the CLI tests' harness), GoogleTest's failures
# with the lines after them, sanitizer and timeout reports.
run_ctest() {  # run_ctest BUILD_DIR CTEST_ARGS...
  local dir="$1"
  shift
  ctest --test-dir "${dir}" "$@" && return 0
  local rc=$?
  echo
  echo "== failed checks (from ${dir}/Testing/Temporary/LastTest.log):"
  awk '/^[0-9]+\/[0-9]+ Test(ing)?: / { name = $3 }
       /FAIL:|\[  FAILED  \]|ERROR: AddressSanitizer|runtime error:|Timeout|timed out/ { print "   [" name "] " $0; n = 0 }
       /: Failure$/ { print "   [" name "] " $0; n = 4; next }
       n > 0 { print "   [" name "] " $0; n-- }' "${dir}/Testing/Temporary/LastTest.log" | head -n 60
  return "${rc}"
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
  # MPI is required here (install_deps.sh installs Open MPI): the multi-process tests of
  # distributed training run in this stage.
  cmake_args=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DMOE_WERROR=ON -DMOE_CUDA="${cuda}" -DMOE_MPI=ON)
  if [[ "${cuda}" == "ON" ]]; then
    cmake_args+=(-DCMAKE_CUDA_COMPILER="$(command -v nvcc)")
    echo "   $(nvcc --version | grep -i release)"
  fi
  stage_begin release "Release build (${RELEASE_DIR}/, MOE_WERROR=ON, MOE_CUDA=${cuda}) + ctest"
  cmake -S . -B "${RELEASE_DIR}" "${cmake_args[@]}"
  cmake --build "${RELEASE_DIR}" -j "${JOBS}"
  run_ctest "${RELEASE_DIR}" --output-on-failure -j2 --no-tests=error --timeout "${CTEST_TIMEOUT}"
  stage_end
fi

# --- stage: asan ------------------------------------------------------------------------
# One sanitizer build for ctest and libFuzzer: clang, ASan+UBSan on everything (line tables only
# for debug info: reports keep file:line, the build is faster than with full -g), plus libFuzzer's
# coverage instrumentation on the parsers' folders (MOE_FUZZ, see CMakeLists.txt; elsewhere the
# ASan runtime's no-op coverage callbacks serve). The fuzz stage's targets link the same moelib,
# which saves the second sanitizer build of the library the stage used to make. Everything must
# compile with clang 14 (Debian 12), tests included: e.g. no lambda capturing a structured binding.
# (An existing ${ASAN_DIR} configured with another compiler is reconfigured by CMake from scratch.)
configure_asan() {
  echo "   $(clang++ --version | head -n1)"
  cmake -S . -B "${ASAN_DIR}" -G Ninja -DCMAKE_C_COMPILER=clang -DCMAKE_CXX_COMPILER=clang++ \
    -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMOE_SANITIZE=ON -DMOE_FUZZ=ON -DMOE_TESTS=ON -DMOE_CUDA=OFF -DMOE_MPI=OFF \
    -DCMAKE_CXX_FLAGS_RELWITHDEBINFO="-O2 -gline-tables-only -DNDEBUG" \
    -DCMAKE_C_FLAGS_RELWITHDEBINFO="-O2 -gline-tables-only -DNDEBUG"
}

if [[ "${MOE_SKIP_ASAN:-0}" == "1" ]]; then
  stage_skip asan MOE_SKIP_ASAN
else
  stage_begin asan "clang ASan+UBSan(+libFuzzer coverage) build (${ASAN_DIR}/, RelWithDebInfo, MOE_CUDA=OFF) + ctest"
  configure_asan
  cmake --build "${ASAN_DIR}" -j "${JOBS}"
  # Excluded from the ASan run (the release stage runs each of them):
  #   GgufLlamaCpp.*   time goes to the uninstrumented llama.cpp peer loading our GGUF files
  #                    (minutes under ASan); our GGUF reader/writer runs under ASan in GgufFile.*,
  #                    GgufModel.*, cli_quantize_gguf and fuzz_gguf.
  #   cli_report_chromium  time goes to headless Chromium rendering the report; the report writer
  #                    itself runs under ASan in ReportTest.* (same code, in process).
  #   PlanVsEngine.MediumPresetInference  a ~1B-parameter bf16 forward (~80 s under ASan) whose
  #                    check, planned == allocated bytes, does not depend on the sanitizer; the same
  #                    bf16 forward code runs under ASan on the fixtures (Reference.Bf16WeightsStayClose)
  #                    and the planner-vs-engine equality on tiny/small presets (PlanVsEngine.*).
  # The tokenizer reference data (node, npm) is the release stage's, when it ran: not generated twice.
  asan_env=()
  if [[ -f "${RELEASE_DIR}/tokenizer-ref/done.stamp" ]]; then
    asan_env+=(MOE_TOKENIZER_REF="$(pwd)/${RELEASE_DIR}/tokenizer-ref")
  fi
  (
    for kv in "${asan_env[@]}" ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1; do
      export "${kv?}"
    done
    run_ctest "${ASAN_DIR}" --output-on-failure -j2 --no-tests=error --timeout "${CTEST_TIMEOUT}" \
      -E '^(GgufLlamaCpp\.|cli_report_chromium$|PlanVsEngine\.MediumPresetInference$)'
  )
  stage_end
fi

# --- stage: fuzz ------------------------------------------------------------------------
if [[ "${MOE_SKIP_FUZZ:-0}" == "1" ]]; then
  stage_skip fuzz MOE_SKIP_FUZZ
else
  stage_begin fuzz "libFuzzer targets (${ASAN_DIR}/) ${FUZZ_SECONDS}s each, ${JOBS} at a time: ${FUZZ_TARGETS[*]}"
  # Already built by the asan stage (a no-op then); configured and built here when it was skipped.
  [[ -f "${ASAN_DIR}/build.ninja" ]] || configure_asan
  cmake --build "${ASAN_DIR}" -j "${JOBS}" --target "${FUZZ_TARGETS[@]/#/fuzz_}"
  artifacts="${ASAN_DIR}/fuzz-artifacts"
  mkdir -p "${artifacts}"
  # Real tokenizer files and chat templates for the seeds, where the release stage set them up.
  tokenizers=""
  for d in "${RELEASE_DIR}/tokenizer-ref/tokenizers" build/tokenizer-ref/tokenizers; do
    if [[ -d "${d}" ]]; then tokenizers="${d}"; break; fi
  done
  # One libFuzzer process per core (each is single-threaded): JOBS targets at a time, each for
  # FUZZ_SECONDS as before, so the stage takes ceil(targets / JOBS) * FUZZ_SECONDS, not the sum.
  # Crashing/hanging inputs are kept in ${artifacts}/ (reproduce: ${ASAN_DIR}/fuzz_TARGET FILE);
  # add them to tests/fuzz_corpus/TARGET/ once fixed. -timeout flags hangs (per input).
  # -entropic_scale_per_exec_time: inputs that run up to a work budget (catastrophic regexes,
  # huge loops; the budget error is the expected outcome) are picked less often, which raises
  # the regex and tokenizer targets from ~50-150 to ~1,500 executions per second.
  # tokenizer_json builds a whole tokenizer per input: small inputs (its seeds fit in 4 KiB).
  run_fuzz() {  # run_fuzz TARGET CORPUS MAX_LEN: writes ${ASAN_DIR}/fuzz_TARGET.{log,rc}
    local rc=0
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
      "${ASAN_DIR}/fuzz_${1}" "${2}" \
        -max_total_time="${FUZZ_SECONDS}" -max_len="${3}" -timeout=10 -rss_limit_mb=2048 \
        -entropic_scale_per_exec_time=1 -print_final_stats=1 \
        -artifact_prefix="${artifacts}/fuzz_${1}-" > "${ASAN_DIR}/fuzz_${1}.log" 2>&1 || rc=$?
    echo "${rc}" > "${ASAN_DIR}/fuzz_${1}.rc"
  }
  for ((i = 0; i < ${#FUZZ_TARGETS[@]}; i += JOBS)); do
    batch=("${FUZZ_TARGETS[@]:i:JOBS}")
    for t in "${batch[@]}"; do
      corpus="$(mktemp -d "${TMPDIR:-/tmp}/moe-fuzz-${t}.XXXXXX")"
      TMP_DIRS+=("${corpus}")
      python3 scripts/fuzz_seeds.py "${t}" "${corpus}" "${FIXTURES_DIR}" ${tokenizers:+"${tokenizers}"}
      max_len=65536
      [[ "${t}" == tokenizer_json ]] && max_len=4096
      echo "-- fuzz_${t}: ${FUZZ_SECONDS}s, -max_len=${max_len}"
      rm -f "${ASAN_DIR}/fuzz_${t}.rc"
      run_fuzz "${t}" "${corpus}" "${max_len}" &
    done
    wait
    for t in "${batch[@]}"; do
      log="${ASAN_DIR}/fuzz_${t}.log"
      rc="$(cat "${ASAN_DIR}/fuzz_${t}.rc" 2>/dev/null || echo 1)"
      echo "-- fuzz_${t} (exit ${rc}):"
      grep -v -E '^#[0-9]+[[:space:]]+(NEW|REDUCE|pulse)' "${log}" || true
      if [[ ${rc} -ne 0 ]]; then
        echo "test.sh: fuzz_${t} failed (exit ${rc}: crash, sanitizer report, timeout or OOM); see ${log}" \
             "and ${artifacts}/" >&2
        exit 1
      fi
    done
  done
  stage_end
fi
