#!/usr/bin/env bash
# Writes the King James Bible (public domain; Debian packages bible-kjv-text + bible-kjv, installed
# by install_deps.sh) as a plain-text training corpus: one verse per line, the verse reference
# ("Ge1:1 ") removed. About 4.1 MB, 31,102 lines.
# usage: bash scripts/kjv_corpus.sh OUT.txt
set -euo pipefail
OUT="${1:?usage: kjv_corpus.sh OUT.txt}"
if ! command -v bible >/dev/null 2>&1; then
  echo "kjv_corpus.sh: the 'bible' program is missing (apt-get install bible-kjv; see scripts/install_deps.sh)" >&2
  exit 1
fi
mkdir -p "$(dirname "${OUT}")"
TMP="${OUT}.tmp.$$"
trap 'rm -f "${TMP}"' EXIT
# -f: no pretty-printing (one verse per line, each preceded by its reference).
bible -f gen1:1-rev22:21 | sed -e 's/^[^ ]* //' >"${TMP}"
LINES=$(wc -l <"${TMP}")
if ((LINES != 31102)); then
  echo "kjv_corpus.sh: expected 31102 verses, got ${LINES}" >&2
  exit 1
fi
mv -f "${TMP}" "${OUT}"
echo "${OUT}: ${LINES} verses, $(wc -c <"${OUT}") bytes"
