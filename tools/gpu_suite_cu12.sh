#!/usr/bin/env bash
# The GPU suite with cuda-bindings 12.x, on a machine whose Python has 13.x:
# what `pip install 'gpuaio[cu12]'` gives, installed ahead of the machine's
# own packages. From the repository root, with .whl/cu12/ holding a
# cuda-bindings 12.x wheel (>= 12.8) and nvrtc12.tar.xz (libnvrtc.so.12 and
# its builtins, from the nvidia-cuda-nvrtc-cu12 wheel: the wheel itself is too
# large to carry to the device machine):
#
#   bash tools/gpu_suite_cu12.sh     # writes what tools/gpu_suite.sh writes
set -o pipefail
site=${GPUAIO_SITE:-/tmp/gpuaio-site-cu12}
lib=$site/nvidia/cuda_nvrtc/lib  # where the nvidia-cuda-nvrtc-cu12 wheel puts it
mkdir -p "$lib"
tar -xJf .whl/cu12/nvrtc12.tar.xz -C "$lib" || exit
# cuda-pathfinder prefers the machine's NVRTC 13 (nvidia/cu13/lib) to ours;
# on a machine with only gpuaio[cu12] installed, NVRTC 12 is the one there is.
cat > "$site/sitecustomize.py" <<PY
import ctypes, os
ctypes.CDLL(os.path.join("$lib", "libnvrtc.so.12"), mode=os.RTLD_GLOBAL)
PY
export GPUAIO_SITE=$site GPUAIO_EXTRA_WHEELS=${GPUAIO_EXTRA_WHEELS:-.whl/cu12/cuda_bindings-*.whl}
# shellcheck disable=SC2086  # the glob is meant to expand
python3 -m pip install -q --no-index --no-deps --upgrade --target "$site" $GPUAIO_EXTRA_WHEELS || exit
mkdir -p "${OUT:-$PWD/out}"
PYTHONPATH=$site python3 -c "
import cuda.bindings, cuda.core
from cuda.pathfinder import load_nvidia_dynamic_lib
print('cu12 run: cuda-bindings', cuda.bindings.__version__, 'cuda-core', cuda.core.__version__)
print('NVRTC:', load_nvidia_dynamic_lib('nvrtc').abs_path)
" 2>&1 | tee "${OUT:-$PWD/out}/cu12-setup.log"
exec bash tools/gpu_suite.sh "$@"
