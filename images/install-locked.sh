#!/bin/sh
# Install the training dependencies from the lock files into the active venv ($VIRTUAL_ENV/bin/pip).
# Used by images/training/Dockerfile and the airflow-local target of images/airflow/Dockerfile, so
# both images get the very same pins.
#
#   install-locked.sh torch LOCK_DIR   # torch + torchvision (+ CUDA wheels for VARIANT=gpu)
#   install-locked.sh deps  LOCK_DIR   # everything else, then `pip check`
#
# VARIANT=gpu (default): requirements-torch.lock as is, hash-checked.
# VARIANT=cpu: the `+cpu` builds of the locked torch/torchvision versions from $TORCH_CPU_INDEX
#              (PyTorch's CPU index; not on PyPI, so pinned by version, not hash); no CUDA wheels.
set -eu
step="$1"
lock_dir="$2"
pip="${VIRTUAL_ENV:?run inside a venv}/bin/pip"
export PIP_USER=false  # the Airflow image sets PIP_USER=true, which a venv's pip refuses
variant="${VARIANT:-gpu}"

locked_version() {  # the version requirements-torch.lock pins for package $1
    sed -n "s/^$1==\([^ ]*\) .*/\1/p" "$lock_dir/requirements-torch.lock"
}

case "$step" in
  torch)
    case "$variant" in
      gpu) "$pip" install --no-deps --require-hashes -r "$lock_dir/requirements-torch.lock" ;;
      cpu) "$pip" install --no-deps --index-url "${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}" \
             "torch==$(locked_version torch)+cpu" "torchvision==$(locked_version torchvision)+cpu" ;;
      *) echo "VARIANT must be gpu or cpu, not '$variant'" >&2; exit 2 ;;
    esac ;;
  deps)
    "$pip" install --no-deps --require-hashes -r "$lock_dir/requirements.lock"
    "$pip" check ;;
  *) echo "usage: install-locked.sh torch|deps LOCK_DIR" >&2; exit 2 ;;
esac
