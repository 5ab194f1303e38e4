#!/usr/bin/env bash
# Create .venv with everything the project needs, including a working Horovod.
#
# Idempotent: a second run reuses .venv and the cached Horovod wheel and takes
# seconds. Knobs (environment variables):
#   PYTHON           interpreter for the venv (default: python3, must be >= 3.11)
#   TORCH_SPEC       torch requirement (default: torch==2.13.0 without a GPU,
#                    plain "torch>=2.1" where nvidia-smi sees a GPU)
#   TORCH_INDEX_URL  extra index for torch, e.g. PyTorch's CPU wheel index
#   HOROVOD_GPU_OPERATIONS  set to NCCL to build Horovod's GPU collectives
#                    (chosen automatically where nvcc and a GPU are present)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
VENV="$ROOT/.venv"
CACHE="$ROOT/.cache/wheels"
HOROVOD_VERSION=0.28.1
PYTHON="${PYTHON:-python3}"

say() { printf '\033[1m[bootstrap]\033[0m %s\n' "$*"; }
die() { printf '\033[1;31m[bootstrap] error:\033[0m %s\n' "$*" >&2; exit 1; }

"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
  || die "Python >= 3.11 is required ($("$PYTHON" --version 2>&1) found); set PYTHON=..."
command -v c++ >/dev/null || die "a C++17 compiler (c++) is required to build Horovod"

if [[ ! -x "$VENV/bin/python" ]]; then
  say "creating $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check --quiet)

has_gpu() { command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; }

# --- torch ------------------------------------------------------------------
# CPU machines get a pinned release (a CPU build where the registry or a local
# wheel offers one); GPU machines take the registry's default CUDA build.
if ! "$PY" -c 'import torch' 2>/dev/null; then
  if [[ -z "${TORCH_SPEC:-}" ]]; then
    if has_gpu; then TORCH_SPEC="torch>=2.1"; else TORCH_SPEC="torch==2.13.0"; fi
  fi
  say "installing $TORCH_SPEC"
  extra=()
  [[ -n "${TORCH_INDEX_URL:-}" ]] && extra=(--extra-index-url "$TORCH_INDEX_URL")
  "${PIP[@]}" "${extra[@]}" "$TORCH_SPEC" numpy
fi
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)')"
# Never let a later install swap the torch Horovod was compiled against.
CONSTRAINTS="$VENV/torch-constraint.txt"
echo "torch==$TORCH_VERSION" >"$CONSTRAINTS"

# --- Horovod ------------------------------------------------------------------
horovod_ok() {
  local out
  out="$("$VENV/bin/horovodrun" --check-build 2>&1)" || return 1
  grep -q '\[X\] PyTorch' <<<"$out" && grep -q '\[X\] Gloo' <<<"$out"
}

if ! horovod_ok 2>/dev/null; then
  "${PIP[@]}" -c "$CONSTRAINTS" numpy "cmake>=3.13,<4" packaging psutil pyyaml cloudpickle wheel "setuptools<81"
  GPU_OPS="${HOROVOD_GPU_OPERATIONS:-}"
  if [[ -z "$GPU_OPS" ]] && has_gpu && command -v nvcc >/dev/null \
     && "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())'; then
    GPU_OPS=NCCL
  fi
  # The wheel links against torch's C++ ABI: key the cache by torch and Python.
  PYTAG="$("$PY" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
  KEY="torch${TORCH_VERSION//+/_}-${PYTAG}-${GPU_OPS:-cpu}"
  WHEEL_DIR="$CACHE/horovod-$HOROVOD_VERSION-$KEY"
  if ! ls "$WHEEL_DIR"/horovod-*.whl >/dev/null 2>&1; then
    say "building Horovod $HOROVOD_VERSION against torch $TORCH_VERSION (${GPU_OPS:-CPU/Gloo}; ~4 min on 2 cores)"
    WORK="$(mktemp -d)"
    trap 'rm -rf "$WORK"' EXIT
    "$PY" -m pip download --disable-pip-version-check --quiet --no-deps --no-binary :all: \
      "horovod==$HOROVOD_VERSION" -d "$WORK"
    tar -xzf "$WORK"/horovod-"$HOROVOD_VERSION".tar.gz -C "$WORK"
    SRC="$WORK/horovod-$HOROVOD_VERSION"
    # torch >= 2.1 headers require C++17; Horovod 0.28.1 asks for C++14.
    for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
      grep -q 'CMAKE_CXX_STANDARD 14' "$f" || die "unexpected Horovod source: no C++14 line in $f"
      sed -i 's/CMAKE_CXX_STANDARD 14/CMAKE_CXX_STANDARD 17/' "$f"
    done
    mkdir -p "$WHEEL_DIR.partial"
    (
      export PATH="$VENV/bin:$PATH"
      export CMAKE_POLICY_VERSION_MINIMUM=3.5  # only read by CMake >= 4
      export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 \
        HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
      [[ -n "$GPU_OPS" ]] && export HOROVOD_GPU_OPERATIONS="$GPU_OPS"
      MAKEFLAGS="-j$(nproc)" "$PY" -m pip wheel --disable-pip-version-check --no-deps \
        --no-build-isolation -w "$WHEEL_DIR.partial" "$SRC" >"$WORK/build.log" 2>&1
    ) || { tail -n 60 "$WORK/build.log" >&2; die "Horovod build failed (log above)"; }
    rm -rf "$WHEEL_DIR" && mv "$WHEEL_DIR.partial" "$WHEEL_DIR"
  else
    say "reusing cached Horovod wheel in $WHEEL_DIR"
  fi
  "${PIP[@]}" -c "$CONSTRAINTS" --force-reinstall --no-deps "$WHEEL_DIR"/horovod-*.whl
fi

# --- the project --------------------------------------------------------------
say "installing the project (editable) with its dev tools"
"${PIP[@]}" -c "$CONSTRAINTS" -e ".[all,dev]"
# Where torch is a CUDA build, the edge runner gets onnxruntime's GPU build (CUDA and
# TensorRT execution providers); both install the same module, so one replaces the other.
if has_gpu && "$PY" -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then
  if ! "$PY" -m pip show --disable-pip-version-check onnxruntime-gpu >/dev/null 2>&1; then
    say "replacing onnxruntime with onnxruntime-gpu"
    "$PY" -m pip uninstall --disable-pip-version-check --quiet -y onnxruntime
    "${PIP[@]}" -c "$CONSTRAINTS" onnxruntime-gpu
  fi
fi

if ! horovod_ok; then
  "$VENV/bin/horovodrun" --check-build >&2 || true
  die "horovodrun --check-build does not list both PyTorch and Gloo"
fi
say "ready: $("$PY" -c 'import torch, horovod; print(f"torch {torch.__version__}, horovod {horovod.__version__}")')"
