#!/usr/bin/env bash
# Install the PyTorch eager peer of bench/train_vs_torch.sh from Debian 12 apt: python3-torch,
# python3-numpy and the pthread OpenBLAS (Debian's torch calls whatever libblas.so.3 the
# alternatives system selects; with only the reference BLAS it runs ~15x slower than users see).
# Not part of scripts/install_deps.sh: only the benchmark needs it. Idempotent.
set -euo pipefail
if [[ "$(id -u)" -eq 0 ]]; then SUDO=(); else SUDO=(sudo); fi
export DEBIAN_FRONTEND=noninteractive
"${SUDO[@]}" apt-get update -qq
"${SUDO[@]}" apt-get install -y --no-install-recommends python3-torch python3-numpy libopenblas0-pthread
# Point libblas.so.3 / liblapack.so.3 at the pthread OpenBLAS (the highest-priority alternative;
# set explicitly in case an earlier manual choice pinned the reference BLAS).
arch="$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)"
for lib in libblas.so.3 liblapack.so.3; do
  alt="/usr/lib/$arch/openblas-pthread/$lib"
  if [[ -e "$alt" ]]; then "${SUDO[@]}" update-alternatives --set "$lib-$arch" "$alt" >/dev/null || true; fi
done
/usr/bin/python3 - <<'PY'
import torch
print("torch", torch.__version__, "threads", torch.get_num_threads())
with open("/proc/self/maps") as f:
    libs = sorted({l.split()[-1] for l in f if "blas" in l.split()[-1].rsplit("/", 1)[-1].lower()})
print("BLAS mapped:", ",".join(libs) or "?")
PY
