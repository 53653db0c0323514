#!/usr/bin/env bash
# One device check: parity on the tiny fixtures, then HyperDAS training steps on a synthetic
# target at batch 16 and 32 with examples/s and peak memory, then (optionally) the authors' own
# training step on the same machine. Prints a summary that docs/gpu.md explains.
#
#   scripts/device-check.sh               # a GPU: the CUDA build, synthetic:llama3-8b in bf16, 20 steps
#   scripts/device-check.sh --cpu         # the CPU build on a small synthetic model (CI runs this)
#
# Options:
#   --bin PATH          the hyperdas binary, unpacked from PATH.xz if only that is there [GPU:
#                       target/cuda/release/hyperdas; --cpu: target/release/hyperdas, built if missing]
#   --model SPEC        the synthetic target [GPU: synthetic:llama3-8b; --cpu: the tiny Llama fixture's configuration]
#   --steps N           timed training steps per batch size [GPU: 20; --cpu: 2]
#   --layer L           the intervention layer [GPU: 15, the paper's middle of Llama-3-8B; --cpu: 1]
#   --authors-cmd CMD   a command that times the authors' training step on this machine (their code is
#                       never part of this repository: bring it beside ours; docs/benchmarks.md says how)
# Exit status: non-zero as soon as a check fails.
set -euo pipefail
cd "$(dirname "$0")/.."

mode=gpu bin="" model="" steps="" layer="" authors_cmd=""
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu) mode=cpu ;;
        --bin) bin="$2"; shift ;;
        --model) model="$2"; shift ;;
        --steps) steps="$2"; shift ;;
        --layer) layer="$2"; shift ;;
        --authors-cmd) authors_cmd="$2"; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "device-check: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

if [ "$mode" = cpu ]; then
    device=cpu
    bin="${bin:-target/release/hyperdas}"
    model="${model:-synthetic:tests/fixtures/tiny-llama/config.json}"
    steps="${steps:-2}"
    layer="${layer:-1}"
else
    device=cuda
    bin="${bin:-target/cuda/release/hyperdas}"
    model="${model:-synthetic:llama3-8b}"
    steps="${steps:-20}"
    layer="${layer:-15}"
fi
# The binary may come compressed (the CUDA one is 82 MB, 11 MB with xz): unpack it beside.
if [ ! -x "$bin" ] && [ -f "$bin.xz" ]; then
    echo "unpacking $bin.xz"
    xz -dk "$bin.xz" && chmod +x "$bin"
fi
if [ "$mode" = cpu ] && [ ! -x "$bin" ] && [ "$bin" = target/release/hyperdas ]; then
    cargo build --release --quiet
fi
[ -x "$bin" ] || { echo "device-check: no binary at $bin (build it: scripts/build-cuda.sh for a GPU)" >&2; exit 1; }

# The CUDA build links the machine's own libcublas.so.13, libcublasLt.so.13, libcurand.so.10 and
# libcudart.so.13 (and the driver's libcuda.so.1). Where the loader does not find one, look in the
# usual places: CUDA toolkits under /usr/local, and the NVIDIA wheels of an installed torch.
missing() { ldd "$bin" 2> /dev/null | awk '/not found/ {print $1}'; }
if command -v ldd > /dev/null && [ -n "$(missing)" ]; then
    dirs=$(ls -d /usr/local/cuda*/lib64 /usr/local/cuda*/targets/*/lib 2> /dev/null || true)
    site=$(python3 -c 'import site; print(" ".join(site.getsitepackages()))' 2> /dev/null || true)
    for sp in $site; do dirs="$dirs $(ls -d "$sp"/nvidia/*/lib "$sp"/nvidia/cu13/lib 2> /dev/null || true)"; done
    # What scripts/build-cuda.sh installed here; its link-time libcuda stub only for --cpu (a stub
    # driver must never stand in for a real one).
    dirs="$dirs $PWD/target/cuda-toolkit/nvidia/cu13/lib"
    [ "$mode" = cpu ] && dirs="$dirs $PWD/target/cuda-toolkit/stub"
    for lib in $(missing); do
        for d in $dirs; do
            if [ -e "$d/$lib" ]; then
                echo "library: $lib from $d"
                export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
                break
            fi
        done
    done
    if [ -n "$(missing)" ]; then
        echo "device-check: $bin cannot find $(missing | tr '\n' ' ')(set LD_LIBRARY_PATH to a CUDA 13 toolkit's lib directory)" >&2
        exit 1
    fi
fi

echo "== device-check ($mode) $(date -u +%Y-%m-%dT%H:%M:%SZ)"
echo "binary: $bin ($("$bin" --version 2>/dev/null || echo unknown))"
if [ "$mode" = gpu ] && command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
fi

echo "== 1. parity with transformers on the tiny fixtures ($device)"
for f in tiny-llama tiny-gemma3; do
    "$bin" verify-model -q --model "tests/fixtures/$f" --reference "tests/fixtures/$f-reference.safetensors" --device "$device" --tolerance 1e-3 > /dev/null
    echo "$f: within 1e-3 of transformers"
done

echo "== 2. HyperDAS training steps on $model (bf16 target, $steps steps, no state cache)"
for batch in 16 32; do
    mem_log=$(mktemp)
    sampler=""
    if [ "$mode" = gpu ] && command -v nvidia-smi > /dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 200 > "$mem_log" &
        sampler=$!
    fi
    args=(--model "$model" --device "$device" --dtype bf16 --batch "$batch" --layer "$layer" --steps "$steps" --warmup 1 --max-tokens 120 --no-cache)
    out=$("$bin" bench train -q --json "${args[@]}")
    [ -n "$sampler" ] && kill "$sampler" 2> /dev/null || true
    gpu_peak=$(sort -n "$mem_log" 2> /dev/null | tail -1)
    rm -f "$mem_log"
    # The dry run's estimate of the same steps, beside the measured peak (docs/gpu.md).
    estimate=$("$bin" bench train -q --json "${args[@]}" --dry-run)
    python3 - "$batch" "${gpu_peak:-}" "$out" "$estimate" <<'PY'
import json, sys
batch, gpu_peak, out, est = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
r = out["passes"][0]["result"]
line = f"batch {batch}: {r['examples_per_s']:.2f} examples/s ({r['median_s']:.3f} s a step, {r['gflop_per_step']:.0f} GFLOP), peak RSS {out['peak_rss_bytes'] / 1e9:.2f} GB"
if gpu_peak:
    line += f", peak GPU memory {int(gpu_peak) / 1024:.2f} GiB"
line += f"; dry-run estimate {est['peak_bytes'] / 1e9:.2f} GB"
print(line)
PY
done

echo "== 3. the authors' training step"
if [ -n "$authors_cmd" ]; then
    bash -c "$authors_cmd"
else
    echo "skipped (no --authors-cmd)"
fi
echo "== device-check done"
