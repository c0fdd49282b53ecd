#!/usr/bin/env bash
# End-to-end CLI test of `moe bench dist` under mpirun: the bytes the distributed training step's
# collectives move per step, summed over the ranks, against the planner's prediction for the same
# job (engine_dist_comm): within 5% with the uniform-routing R_off the plan assumes, and to the
# byte with the R_off measured from the step's routing. Time is reported, never asserted.
# Skipped (77) without mpirun or when the binary has no MPI.
# usage: bash bench_dist.sh <moe binary> <fixtures dir>   (run by ctest as cli_bench_dist)
set -u

MOE="${1:?usage: bench_dist.sh <moe binary> <fixtures dir>}"
FIX="${2:?usage: bench_dist.sh <moe binary> <fixtures dir>}"
command -v mpirun >/dev/null || { echo "SKIPPED: mpirun not found"; exit 77; }
# The harness works in a temporary directory: absolute paths.
[[ "${MOE}" == */* ]] && MOE="$(cd "$(dirname "${MOE}")" && pwd)/$(basename "${MOE}")"
FIX="$(cd "${FIX}" && pwd)"

source "$(dirname "${BASH_SOURCE[0]}")/lib/harness.bash"

# Without mpirun: a build without MPI says so (skip); one with MPI asks for mpirun.
run no-mpirun "${MOE}" bench dist "${FIX}/mixtral" --ep 2
if grep -q "has no MPI" <<<"${OUT}"; then
  echo "SKIPPED: this moe was built without MPI"
  exit 77
fi
expect_err no-mpirun "mpirun -np"

MPI=(mpirun --oversubscribe -x OMP_NUM_THREADS=1 -x OMP_WAIT_POLICY=passive)
if [[ "$(id -u)" == 0 ]]; then MPI+=(--allow-run-as-root); fi

# The total row of the bytes table: measured / plan, then measured / plan at the measured R_off.
check_ratios() {
  local name="$1" plan routed
  plan="$(awk '$1 == "total" && $2 == "ratio" {print $NF}' <<<"${OUT}")"
  routed="$(awk '$1 == "total" && $2 != "ratio" {print $NF}' <<<"${OUT}")"
  if [[ -n "${plan}" ]] && awk -v r="${plan}" 'BEGIN {exit !(r >= 0.95 && r <= 1.05)}'; then
    pass "${name}: measured / plan = ${plan} (within 5%)"
  else
    fail "${name}: measured / plan = '${plan}', expected within [0.95, 1.05]"
  fi
  if [[ "${routed}" == "1.0000" ]]; then
    pass "${name}: measured / plan at the measured R_off = 1.0000"
  else
    fail "${name}: measured / plan at the measured R_off = '${routed}', expected 1.0000 (the formula is exact)"
  fi
}

run ep2 "${MPI[@]}" -np 2 "${MOE}" bench dist "${FIX}/mixtral" --ep 2 --steps 2
expect_ok ep2
check_ratios "mixtral -np 2 --ep 2"
grep -q "all-to-all ms" <<<"${OUT}" && pass "ep2: time split printed" || fail "ep2: no time split"

run ep2dp2 "${MPI[@]}" -np 4 "${MOE}" bench dist "${FIX}/qwen2_moe" --ep 2 --dp 2 --steps 2 --recompute --json
expect_ok ep2dp2
check_ratios "qwen2_moe -np 4 --ep 2 --dp 2 --recompute"
grep -q '^{"batch"' <<<"${OUT}" && pass "ep2dp2: --json line" || fail "ep2dp2: no JSON line"

run bad-layout "${MPI[@]}" -np 2 "${MOE}" bench dist "${FIX}/mixtral" --ep 3
expect_err bad-layout "does not divide"

finish
