#!/usr/bin/env bash
# Build hyperdas with `--features cuda` on a machine with no CUDA toolkit and no GPU, from the
# NVIDIA wheels on PyPI (the recipe measured in ../shared/design/rust-ml-notes.md; docs/gpu.md).
# With a normal CUDA toolkit installed you do not need this: `cargo build --release --features cuda`.
#
#   scripts/build-cuda.sh                  # -> target/cuda/release/hyperdas
#   CUDA_COMPUTE_CAP=80 scripts/build-cuda.sh
#
# Pins CUDA 13.0 (nvcc 13.0.88, runtime, cuBLAS 13.0.2, cuRAND 10.4.0, NVRTC), the oldest CUDA 13:
# a driver from 580 on runs it. The toolkit goes to target/cuda-toolkit (about 1 GB), the build to
# target/cuda. The binary needs libcuda.so.1 (the driver), libcublas.so.13, libcublasLt.so.13,
# libcurand.so.10 and libcudart.so.13 at run time: copy target/cuda-toolkit/nvidia/cu13/lib along,
# or point LD_LIBRARY_PATH at an installed toolkit.
set -euo pipefail
cd "$(dirname "$0")/.."
root="$PWD/target/cuda-toolkit"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="$PWD/target/cuda"

if [ ! -x "$root/nvidia/cu13/bin/nvcc" ]; then
    echo "== installing the CUDA 13.0 wheels into $root"
    python3 -m pip install --quiet --no-deps --target "$root" \
        "nvidia-cuda-nvcc==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-crt==13.0.88" \
        "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-runtime==13.0.96" "nvidia-cuda-nvrtc==13.0.88" \
        "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35"
fi
cu="$root/nvidia/cu13"
export CUDA_HOME="$cu" CUDA_PATH="$cu" PATH="$cu/bin:$PATH"
nvcc --version | tail -2

# The wheels ship versioned sonames only; the linker wants the unversioned names.
for lib in cublas cublasLt curand cudart nvrtc; do
    so=$(ls "$cu/lib/lib$lib.so."* 2>/dev/null | sort | head -1 || true)
    if [ -z "$so" ]; then echo "missing lib$lib in $cu/lib" >&2; exit 1; fi
    ln -sf "$(basename "$so")" "$cu/lib/lib$lib.so"
done

# Compile everything except the final link (the library crate needs no libcuda). Both cargo
# calls get the same RUSTFLAGS (the stub directory is named before it holds the stub), or the
# second would rebuild every crate, candle's CUDA kernels included.
stub="$root/stub"
mkdir -p "$stub"
export RUSTFLAGS="-L $cu/lib -L $stub ${RUSTFLAGS:-}"
echo "== building the library with the cuda feature (nvcc compiles candle's kernels: minutes)"
cargo build --release --features cuda --lib

# A link-time stub for the driver library, from the cu* symbols cudarc uses. The real
# libcuda.so.1 comes with the GPU driver; the stub is never shipped or loaded.
rlib=$(ls -t "$CARGO_TARGET_DIR"/release/deps/libcudarc-*.rlib | head -1)
nm -u "$rlib" 2>/dev/null | awk '{print $NF}' | grep -E '^cu[A-Z]' | sort -u > "$stub/symbols.txt"
echo "== libcuda stub: $(wc -l < "$stub/symbols.txt") driver symbols"
awk '{print "void " $1 "(void) {}"}' "$stub/symbols.txt" > "$stub/libcuda.c"
cc -shared -fPIC -o "$stub/libcuda.so" -Wl,-soname,libcuda.so.1 "$stub/libcuda.c"

echo "== linking hyperdas"
cargo build --release --features cuda --bin hyperdas
bin="$CARGO_TARGET_DIR/release/hyperdas"
ls -la "$bin"
echo "built $bin (compute capability $CUDA_COMPUTE_CAP). Run it with LD_LIBRARY_PATH=$cu/lib on a machine with the NVIDIA driver."
