#!/usr/bin/env bash
# The Helm chart's tests (`make chart-test`): renders charts/accordion with Helm's own engine for
# each values file in tests/chart/, validates every object against Kubernetes 1.33/1.34/1.35's
# OpenAPI schemas (strict), runs `helm lint --strict`, and asserts the objects' content, bad values'
# failures, the values documentation and a mutation self-test (tests/chart/check.py).
#
#   scripts/chart-test.sh                         # all of it; one line per case, then "N passed, N failed"
#   scripts/chart-test.sh template [-f FILE]... [--name R] [--namespace NS] [--notes]
#                                                 # `helm template R charts/accordion ...` to stdout
#
# Tools (installed by this script, idempotent, cached): a Python venv under
# ${ACCORDION_CACHE:-~/.cache/accordion}/chart-tools with helm-python-sdk (Helm v4.2.3's Go SDK as a
# shared library) and kubernetes-validate, pinned in tests/chart/requirements*.txt. The rendered
# manifests of the last run are left in chart-tools/rendered/.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE="${ACCORDION_CACHE:-$HOME/.cache/accordion}"
TOOLS="$CACHE/chart-tools"
REQ_HASHED="$ROOT/tests/chart/requirements-hashed.txt"
REQ="$ROOT/tests/chart/requirements.txt"

log() { echo "chart-test: $*" >&2; }

# Debian's python3 when there is one (python3-venv is a Debian package), else the first on PATH.
pick_python() {
    local p
    for p in /usr/bin/python3 python3; do
        if command -v "$p" >/dev/null && "$p" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
            echo "$p"
            return
        fi
    done
    log "need Python >= 3.11 (tomllib)"
    exit 1
}

ensure_venv_module() {
    local py=$1
    if "$py" -c 'import venv, ensurepip' 2>/dev/null; then
        return
    fi
    if [ "$py" = /usr/bin/python3 ] && command -v apt-get >/dev/null; then
        local sudo=
        [ "$(id -u)" = 0 ] || sudo=sudo
        log "installing python3-venv (apt-get)"
        $sudo apt-get update -q >&2
        $sudo apt-get install -y -q python3-venv >&2
    fi
    "$py" -c 'import venv, ensurepip' || { log "$py has no venv/ensurepip module"; exit 1; }
}

PY=$(pick_python)
# One venv per (requirements, Python version, architecture); a stale one is removed.
key=$( { cat "$REQ_HASHED" "$REQ"; "$PY" -c 'import sys, platform; print(sys.version, platform.machine())'; } \
    | sha256sum | cut -c1-16)
VENV="$TOOLS/venv-$key"
if [ ! -f "$VENV/.complete" ]; then
    start=$(date +%s)
    ensure_venv_module "$PY"
    log "installing the chart tools into $VENV (helm-python-sdk, kubernetes-validate; ~100 MB download, once)"
    rm -rf "$VENV"
    mkdir -p "$TOOLS"
    "$PY" -m venv "$VENV" >&2
    PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
    "${PIP[@]}" install --require-hashes --no-deps --only-binary=:all: -r "$REQ_HASHED" >&2
    "${PIP[@]}" install --only-binary=:all: -r "$REQ" >&2
    "$VENV/bin/python" -c 'import helm_python, kubernetes_validate, yaml, jsonschema' >&2
    "${PIP[@]}" check >&2
    # The wheel holds libhelm_c.so three times (.so, .so.0, .so.0.2.2; 85 MB each): keep one.
    for lib in "$VENV"/lib/python3*/site-packages/helm_python/lib/libhelm_c.so.*; do
        if cmp -s "$lib" "${lib%%.so*}.so"; then ln -f "${lib%%.so*}.so" "$lib"; fi
    done
    touch "$VENV/.complete"
    for old in "$TOOLS"/venv-*; do
        [ "$old" = "$VENV" ] || { log "removing stale $old"; rm -rf "$old"; }
    done
    log "chart tools installed in $(( $(date +%s) - start ))s"
fi

export PYTHONDONTWRITEBYTECODE=1
case "${1:-}" in
template)
    shift
    exec "$VENV/bin/python" "$ROOT/tests/chart/helm_template.py" "$ROOT/charts/accordion" "$@"
    ;;
"")
    rm -rf "$TOOLS/rendered"
    CHART_TEST_OUT="$TOOLS/rendered" exec "$VENV/bin/python" "$ROOT/tests/chart/check.py"
    ;;
*)
    echo "usage: $0 [template [-f VALUES]... [--name RELEASE] [--namespace NS] [--notes]]" >&2
    exit 2
    ;;
esac
