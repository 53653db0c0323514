#!/usr/bin/env bash
# Every test of the project: the Rust suite (cargo test), the device check in its CPU mode (on the
# binary cargo test built), then the Python bindings (pytest).
# This is the README's test command, and what CI (.ci/run) runs on a fresh clone.
#
# Python: a private virtual environment in target/pytest-venv gets maturin, numpy and pytest
# from PyPI, and the package built from this tree (`pip install .`, in the dev profile so that it
# reuses the dependencies `cargo test` compiled), then pytest runs python/tests against it.
set -euo pipefail
cd "$(dirname "$0")/.."
export RAYON_NUM_THREADS="${RAYON_NUM_THREADS:-1}"

cargo test --features hub
scripts/device-check.sh --cpu --bin target/debug/hyperdas

venv="$PWD/target/pytest-venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
export PATH="$venv/bin:$PATH" # maturin's build hook runs the `maturin` of the environment
"$venv/bin/python" -m pip install -q --upgrade "maturin>=1.9,<2" "numpy>=1.21" "pytest>=7"
MATURIN_PEP517_ARGS="--profile dev" "$venv/bin/python" -m pip install -q --no-build-isolation --force-reinstall --no-deps .
"$venv/bin/python" -m pytest -q
