#!/usr/bin/env bash
# Install the build and test dependencies of MoE Engine from Debian 12 (bookworm) apt.
# Idempotent: safe to run again; apt-get skips what is already installed.
# The CUDA toolkit is NOT installed here: it is expected preinstalled at /usr/local/cuda.
# This script only reports whether nvcc can be found.
set -euo pipefail

if [[ "$(id -u)" -eq 0 ]]; then
  SUDO=()
else
  if ! command -v sudo >/dev/null 2>&1; then
    echo "install_deps.sh: not root and sudo is not available" >&2
    exit 1
  fi
  SUDO=(sudo)
fi

# Core toolchain and libraries. libomp-dev: clang's OpenMP runtime, needed by the
# clang/libFuzzer build (find_package(OpenMP) fails under clang without it).
# libdnnl-dev: oneDNN, the bf16 prefill GEMMs on CPUs with AMX or AVX512-BF16. Debian's oneDNN is
# built with its OpenCL GPU runtime, so its CMake package requires OpenCL's loader and headers
# (ocl-icd-opencl-dev); without them find_package(dnnl) stops the configure.
# libclang-rt-14-dev: libFuzzer and the clang sanitizer runtimes.
# libsentencepiece-dev: tokenizer.model (SentencePiece) support; sentencepiece: its spm_train /
# spm_encode / spm_decode tools, which the tokenizer tests use as the reference.
PACKAGES=(
  build-essential
  cmake
  ninja-build
  pkg-config
  libopenblas-dev
  libopenblas-openmp-dev
  libdnnl-dev
  ocl-icd-opencl-dev
  nlohmann-json3-dev
  libcli11-dev
  libcpp-httplib-dev
  libgtest-dev
  googletest
  libbenchmark-dev
  libsentencepiece-dev
  sentencepiece
  clang
  libclang-rt-14-dev
  libomp-dev
  python3
  git
  ca-certificates
  # Training corpus: the King James Bible (public domain). bible-kjv-text holds it compressed in
  # /usr/lib/bible.data (not plain text); bible-kjv's `bible` program decodes it:
  # scripts/kjv_corpus.sh writes it as plain text (one verse per line, 4.4 MB).
  bible-kjv-text
  bible-kjv
  # Headless browser for the report test (tests/cli/report_chromium.sh).
  chromium
  # Distributed training and inference (src/dist/): Open MPI and its mpirun.
  libopenmpi-dev
  openmpi-bin
)

export DEBIAN_FRONTEND=noninteractive
echo "== install_deps: apt-get update"
"${SUDO[@]}" apt-get update -q
echo "== install_deps: apt-get install ${PACKAGES[*]}"
"${SUDO[@]}" apt-get install -y -q --no-install-recommends "${PACKAGES[@]}"

# CUDA: report only.
export PATH="/usr/local/cuda/bin:${PATH}"
if command -v nvcc >/dev/null 2>&1; then
  echo "== install_deps: nvcc found at $(command -v nvcc): $(nvcc --version | grep -i release || true)"
else
  echo "== install_deps: nvcc NOT found (looked in PATH and /usr/local/cuda/bin); CUDA backend will not be built"
fi
echo "== install_deps: done"
