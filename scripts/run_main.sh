#!/usr/bin/env bash
# Build MoE Engine (Release, into build/) and run the main job on the embedded default
# model: create a tiny random Mixtral-style model and generate 16 tokens from it.
# The CUDA backend is compiled when nvcc is found (it runs only where a GPU is present).
# Override with MOE_CUDA=ON|OFF.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

export PATH="/usr/local/cuda/bin:${PATH}"
if [[ -z "${MOE_CUDA:-}" ]]; then
  if command -v nvcc >/dev/null 2>&1; then MOE_CUDA=ON; else MOE_CUDA=OFF; fi
fi
CMAKE_ARGS=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DMOE_CUDA="${MOE_CUDA}")
if [[ "${MOE_CUDA}" == "ON" ]]; then
  CMAKE_ARGS+=(-DCMAKE_CUDA_COMPILER="$(command -v nvcc)")
fi

echo "== run_main: configure (build/, Release, MOE_CUDA=${MOE_CUDA})"
cmake -S . -B build "${CMAKE_ARGS[@]}"
echo "== run_main: build the moe CLI"
cmake --build build --target moe -j "$(nproc)"

OUT_DIR=out/tiny-mixtral
rm -rf "${OUT_DIR}"
mkdir -p out
echo "== run_main: build/moe init --arch mixtral --preset tiny --seed 1 --out ${OUT_DIR}"
build/moe init --arch mixtral --preset tiny --seed 1 --out "${OUT_DIR}"
echo "== run_main: build/moe generate ${OUT_DIR} --ids 1,2,3 --max-new-tokens 16 --seed 1"
build/moe generate "${OUT_DIR}" --ids 1,2,3 --max-new-tokens 16 --seed 1
