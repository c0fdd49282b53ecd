#!/usr/bin/env bash
# setup.sh — prepares llama.cpp as the reference for the GGUF tests:
#   1. npm install (versions pinned by package-lock.json) into tests/gguf/node_modules: node-llama-cpp (llama.cpp's source as a git bundle)
#      and @node-llama-cpp/linux-x64 (prebuilt llama.cpp CPU libraries with run-time CPU variant
#      selection), pinned by package-lock.json; optional GPU variants are not installed;
#   2. llama.h / ggml headers of the same release, taken from the bundle;
#   3. OUTDIR/llama_ref, built from llama_ref.cpp against the shipped libllama.
# OUTDIR/env then names LLAMA_REF (the binary) and LLAMA_REF_LIBDIR (the library folder).
# Idempotent and concurrency-safe (flock).
# usage: bash tests/gguf/setup.sh OUTDIR     exit 0 = ready, 3 = npm/node/git/g++ unavailable
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:?usage: setup.sh OUTDIR}"
mkdir -p "${OUT}"
OUT="$(cd "${OUT}" && pwd)"

for tool in node npm git g++; do
  if ! command -v "${tool}" >/dev/null 2>&1; then
    echo "setup.sh: ${tool} not found" >&2
    exit 3
  fi
done
if [[ "$(uname -m)" != "x86_64" ]]; then
  echo "setup.sh: the pinned llama.cpp libraries are for linux x86_64 only" >&2
  exit 3
fi

exec 9>"${OUT}/.lock"
flock 9

STAMP_WANT="$(cat "${HERE}/package-lock.json" "${HERE}/llama_ref.cpp" "${HERE}/setup.sh" | sha256sum | cut -d' ' -f1)"
if [[ -f "${OUT}/done.stamp" && "$(cat "${OUT}/done.stamp")" == "${STAMP_WANT}" && -x "${OUT}/llama_ref" ]]; then
  exit 0
fi
rm -f "${OUT}/done.stamp"

LOCK_SUM="$(sha256sum "${HERE}/package-lock.json" | cut -d' ' -f1)"
if [[ ! -f "${HERE}/node_modules/.moe-lock-sum" || "$(cat "${HERE}/node_modules/.moe-lock-sum")" != "${LOCK_SUM}" ]]; then
  echo "setup.sh: npm install (pinned by package-lock.json) in ${HERE}" >&2
  # --ignore-scripts: node-llama-cpp's postinstall would try to download or build binaries; the
  # prebuilt ones come from the pinned @node-llama-cpp/linux-x64 package instead.
  if ! (cd "${HERE}" && npm install --no-save --omit=optional --ignore-scripts --no-audit --no-fund --loglevel=error >&2); then
    echo "setup.sh: npm install failed (registry unreachable?)" >&2
    exit 3
  fi
  echo "${LOCK_SUM}" > "${HERE}/node_modules/.moe-lock-sum"
fi

LIBDIR="${HERE}/node_modules/@node-llama-cpp/linux-x64/bins/linux-x64"
BUNDLE="${HERE}/node_modules/node-llama-cpp/llama/gitRelease.bundle"
for f in "${LIBDIR}" "${BUNDLE}"; do
  if [[ ! -e "${f}" ]]; then
    echo "setup.sh: ${f} missing from the npm packages" >&2
    exit 1
  fi
done
LIBLLAMA="$(cd "${LIBDIR}" && ls libllama.v*.so 2>/dev/null | head -n1 || true)"
LIBGGML="$(cd "${LIBDIR}" && ls libggml.v*.so 2>/dev/null | head -n1 || true)"
if [[ -z "${LIBLLAMA}" || -z "${LIBGGML}" ]]; then
  echo "setup.sh: no libllama/libggml in ${LIBDIR}" >&2
  exit 1
fi

echo "setup.sh: headers from ${BUNDLE}" >&2
rm -rf "${OUT}/src" "${OUT}/repo"
mkdir -p "${OUT}/src"
git init -q "${OUT}/repo"
git -C "${OUT}/repo" fetch -q "${BUNDLE}" HEAD:refs/bundle/head
REV=refs/bundle/head
git -C "${OUT}/repo" archive "${REV}" include ggml/include | tar -x -C "${OUT}/src"
rm -rf "${OUT}/repo"

echo "setup.sh: building ${OUT}/llama_ref" >&2
g++ -std=c++17 -O1 -o "${OUT}/llama_ref" "${HERE}/llama_ref.cpp" \
  -I"${OUT}/src/include" -I"${OUT}/src/ggml/include" \
  "${LIBDIR}/${LIBLLAMA}" "${LIBDIR}/${LIBGGML}" "${LIBDIR}/libggml-base.so" -Wl,-rpath,"${LIBDIR}"

printf 'LLAMA_REF=%s\nLLAMA_REF_LIBDIR=%s\n' "${OUT}/llama_ref" "${LIBDIR}" > "${OUT}/env"
echo "${STAMP_WANT}" > "${OUT}/done.stamp"
