#!/usr/bin/env bash
# device_build.sh — configure and build MoE Engine (MOE_CUDA=ON) on a GPU machine that lacks the
# Debian dev packages the project needs (OpenBLAS, nlohmann-json, CLI11, GoogleTest; oneDNN is
# optional: with it, a host CPU with AMX or AVX512-BF16 can run `moe bench prefill --dtype bf16`'s
# matrix-unit comparison, the measurement issue 12 still lacks).
#
# Those packages travel as .devdeps/devdeps.tar.xz (made on the dev machine with apt-get
# download + dpkg -x, see below); this script unpacks them under .devdeps/root, points the .pc
# files at that prefix, and configures with CMAKE_PREFIX_PATH / PKG_CONFIG_PATH / rpaths so the
# binaries run without LD_LIBRARY_PATH.
#
#   usage: scripts/device_build.sh [build-dir] [targets...]     (default: build-dev moe_tests)
#
# Making the tarball (dev machine, repo root; .devdeps/ is git-ignored):
#   mkdir -p .devdeps && cd .devdeps && apt-get download libopenblas0-pthread libopenblas-pthread-dev \
#     libopenblas-dev libopenblas0 nlohmann-json3-dev libcli11-dev libgtest-dev googletest libgfortran5 \
#     pkgconf-bin libpkgconf3 libsentencepiece-dev libsentencepiece0 libprotobuf-lite32 \
#     libdnnl-dev libdnnl2 ocl-icd-libopencl1 ocl-icd-opencl-dev opencl-c-headers opencl-clhpp-headers \
#     && for f in *.deb; do dpkg -x $f root; done && \
#     rm -rf root/usr/share/doc root/usr/src && tar -cJf devdeps.tar.xz root
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BUILD=${1:-build-dev}
shift || true
TARGETS=${*:-moe_tests}
DEPS=$ROOT/.devdeps
if [ ! -d "$DEPS/root" ]; then
  tar -C "$DEPS" -xJf "$DEPS/devdeps.tar.xz"
fi
R=$DEPS/root/usr
LIB=$R/lib/x86_64-linux-gnu
if [ ! -f "$DEPS/root/.prefixed" ]; then
  find "$R" -name '*.pc' -exec sed -i "s#=/usr/#=$R/#g" {} +
  touch "$DEPS/root/.prefixed"
fi
export PKG_CONFIG_PATH=$LIB/openblas-pthread/pkgconfig:$LIB/pkgconfig:$R/share/pkgconfig
PKGCONF_ARG=()
if ! command -v pkg-config >/dev/null 2>&1; then
  export LD_LIBRARY_PATH=$LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  PKGCONF_ARG=(-DPKG_CONFIG_EXECUTABLE="$R/bin/pkgconf")
fi
RPATH="$LIB/openblas-pthread:$LIB"
cmake -S "$ROOT" -B "$ROOT/$BUILD" -G Ninja -DMOE_CUDA=ON -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_ARCHITECTURES=90 -DCMAKE_CUDA_STANDARD=17 \
  -DCMAKE_PREFIX_PATH="$R" "${PKGCONF_ARG[@]}" \
  -DCMAKE_EXE_LINKER_FLAGS="-Wl,-rpath-link,$LIB -Wl,-rpath,$RPATH"
ninja -C "$ROOT/$BUILD" -j"$(nproc)" $TARGETS
