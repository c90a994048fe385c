#!/usr/bin/env bash
# Builds the isolated virtual environment for the MCT peer benchmark.
#
# Sony's model-compression-toolkit (MCT) only runs its Keras path with
# TensorFlow < 2.16, so it cannot share keras_mpq's venv (TF 2.21). This script
# creates a separate venv with python3.11 and the pins in requirements.txt
# (tensorflow==2.15.1, model-compression-toolkit==2.6.1, ...). It is
# idempotent: an existing venv whose pinned versions already match is left
# alone; otherwise the missing/mismatching pins are (re)installed.
#
# Usage:
#   benchmarks/peer_mct/setup_env.sh            # venv at /work/main/.mct_venv
#   MCT_VENV=/tmp/mct benchmarks/peer_mct/setup_env.sh
#   MCT_PYTHON=python3.11 (default) picks the interpreter that builds the venv.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "${HERE}/../.." && pwd)"
VENV="${MCT_VENV:-${REPO}/.mct_venv}"
PY_BIN="${MCT_PYTHON:-python3.11}"
REQS="${HERE}/requirements.txt"

if ! command -v "${PY_BIN}" >/dev/null 2>&1; then
  echo "setup_env.sh: Expected a Python 3.11 interpreter on PATH. Received:" \
       "MCT_PYTHON=${PY_BIN} (not found). Install python3.11 or set MCT_PYTHON." >&2
  exit 2
fi

if [[ ! -x "${VENV}/bin/python" ]]; then
  echo "setup_env.sh: creating venv at ${VENV}"
  "${PY_BIN}" -m venv "${VENV}"
  "${VENV}/bin/python" -m pip install --quiet --upgrade pip
fi

# Quick check: are all pins already satisfied? (pip's own resolver decides.)
check_pins() {
  "${VENV}/bin/python" - "${REQS}" <<'EOF'
import sys
from importlib import metadata
from packaging.requirements import Requirement
ok = True
for line in open(sys.argv[1]):
  line = line.split("#", 1)[0].strip()
  if not line:
    continue
  req = Requirement(line)
  try:
    have = metadata.version(req.name)
  except metadata.PackageNotFoundError:
    ok = False
    continue
  if not req.specifier.contains(have, prereleases=True):
    ok = False
sys.exit(0 if ok else 1)
EOF
}

if check_pins 2>/dev/null; then
  echo "setup_env.sh: pins already satisfied in ${VENV}"
else
  echo "setup_env.sh: installing pins from ${REQS} (this downloads ~600 MB once)"
  "${VENV}/bin/python" -m pip install --quiet --disable-pip-version-check -r "${REQS}"
  check_pins
fi

TF_CPP_MIN_LOG_LEVEL=3 "${VENV}/bin/python" - <<'EOF'
import sys
from importlib import metadata
import tensorflow as tf
import model_compression_toolkit as mct
from model_compression_toolkit.verify_packages import FOUND_TF
if not FOUND_TF:
  sys.exit("setup_env.sh: MCT does not see a supported TensorFlow "
           f"(found {tf.__version__}); its Keras API is unavailable.")
print(f"python {sys.version.split()[0]}")
for name in ("tensorflow", "model-compression-toolkit", "mct-quantizers",
             "edge-mdt-cl", "numpy", "keras"):
  print(f"{name} {metadata.version(name)}")
EOF
