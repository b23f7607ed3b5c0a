#!/usr/bin/env bash
# Create (once) a Python venv holding a pinned `onnx` + `numpy`, for the
# secinfer test suite (onnx.checker, onnx.reference, the ONNX conformance data).
#
#   scripts/onnx-venv.sh            -> last line of stdout: the venv's python
#
# Venv location: ${SECINFER_ONNX_VENV:-<repo>/target/onnx-venv}.
# Interpreter used to create it: ${SECINFER_PYTHON:-python3} (3.11 recommended).
# Idempotent: does nothing if the venv exists and its marker file records the
# pinned versions below; otherwise (re)creates it. Safe to run from several
# processes at once (flock on "<venv>.lock"). All pip / venv output goes to
# stderr; stdout carries only the python path.
set -euo pipefail

ONNX_VERSION="1.23.2"
NUMPY_VERSION="2.4.6"
PINS="onnx==${ONNX_VERSION} numpy==${NUMPY_VERSION}"
MARKER_NAME=".secinfer-onnx-venv"

die() { echo "onnx-venv.sh: error: $*" >&2; exit 1; }
log() { echo "onnx-venv.sh: $*" >&2; }

script_dir="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo_dir="$(cd "${script_dir}/.." && pwd)"
venv="${SECINFER_ONNX_VENV:-${repo_dir}/target/onnx-venv}"
case "${venv}" in
  /*) ;;
  *) venv="$(pwd)/${venv}" ;;
esac
venv="${venv%/}"
marker="${venv}/${MARKER_NAME}"
py="${venv}/bin/python"
base_python="${SECINFER_PYTHON:-python3}"

venv_ok() {
  [ -f "${marker}" ] && [ "$(cat "${marker}" 2>/dev/null)" = "${PINS}" ] \
    && [ -x "${py}" ] && "${py}" -c "import onnx, numpy" >/dev/null 2>&1
}

build_venv() {
  command -v "${base_python}" >/dev/null 2>&1 \
    || die "'${base_python}' not found; install Python 3 (3.11 recommended) or set SECINFER_PYTHON"
  if [ -e "${venv}" ]; then
    log "venv at ${venv} is missing, broken or pinned to other versions; recreating it"
    rm -rf -- "${venv}" || die "cannot remove stale venv ${venv}"
  fi
  log "creating venv ${venv} with ${base_python} ($("${base_python}" --version 2>&1))"
  "${base_python}" -m venv "${venv}" 1>&2 \
    || die "'${base_python} -m venv ${venv}' failed (on Debian/Ubuntu: apt-get install python3-venv)"
  [ -x "${py}" ] || die "venv created but ${py} is missing"
  log "installing ${PINS} (pip output follows)"
  "${py}" -m pip install --disable-pip-version-check --no-input ${PINS} 1>&2 \
    || die "pip install ${PINS} into ${venv} failed (needs access to PyPI or a local wheel mirror)"
  "${py}" -c "import onnx, numpy; assert onnx.__version__ == '${ONNX_VERSION}', onnx.__version__" 1>&2 \
    || die "onnx ${ONNX_VERSION} does not import in ${venv}"
  # Marker written last, atomically: its presence means the venv is complete.
  printf '%s' "${PINS}" > "${marker}.tmp" && mv -f "${marker}.tmp" "${marker}" \
    || die "cannot write marker ${marker}"
  log "venv ready: ${py}"
}

mkdir -p "$(dirname "${venv}")" || die "cannot create $(dirname "${venv}")"
lock="${venv}.lock"

if command -v flock >/dev/null 2>&1; then
  exec 9>"${lock}" || die "cannot open lock file ${lock}"
  flock 9 || die "flock ${lock} failed"
  venv_ok || build_venv
  flock -u 9
  exec 9>&-
else
  # No util-linux flock: fall back to an atomic mkdir lock.
  lockdir="${lock}.d"
  waited=0
  until mkdir "${lockdir}" 2>/dev/null; do
    sleep 1
    waited=$((waited + 1))
    [ "${waited}" -lt 1800 ] || die "timed out waiting for lock ${lockdir} (remove it if stale)"
  done
  trap 'rmdir "${lockdir}" 2>/dev/null || true' EXIT
  venv_ok || build_venv
fi

echo "${py}"
