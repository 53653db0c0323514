"""Shared fixtures: the repository's tiny random models and RAVEL rows (tests/fixtures)."""

import json
import os
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest

FIXTURES = Path(__file__).resolve().parents[2] / "tests" / "fixtures"

# The tool's cache (knowledge tables, the toy world) in a fresh directory, never the user's.
os.environ["HYPERDAS_HOME"] = tempfile.mkdtemp(prefix="hyperdas-pytest-")


def read_safetensors(path):
    """A safetensors file as {name: array} and its metadata (the format is a JSON header + raw bytes)."""
    raw = Path(path).read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    dtypes = {"F32": np.float32, "I64": np.int64, "U8": np.uint8}
    out = {}
    for name, h in header.items():
        a, b = h["data_offsets"]
        out[name] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=dtypes[h["dtype"]]).reshape(h["shape"])
    return out, meta


@pytest.fixture(scope="session")
def tiny_llama_dir():
    return FIXTURES / "tiny-llama"


@pytest.fixture(scope="session")
def tiny(tiny_llama_dir):
    import hyperdas

    return hyperdas.Model.load(tiny_llama_dir)


@pytest.fixture(scope="session")
def rows_path():
    return FIXTURES / "ravel" / "city_country_test.jsonl"


@pytest.fixture(scope="session")
def runs(tmp_path_factory, tiny_llama_dir, rows_path):
    """An MDAS and a HyperDAS run (a few steps each) on the tiny Llama and the fixture rows."""
    import hyperdas

    root = tmp_path_factory.mktemp("runs")
    cfg = {
        "model.path": str(tiny_llama_dir),
        "data.train": str(rows_path),
        "data.test": str(rows_path),
        "train": {"epochs": 1, "batch_size": 16},
        "interpreter": {"layer": 1, "rank": 4, "num_blocks": 1},
        "eval.modes": ["soft", "bidding_argmax"],
    }
    records = []
    mdas = hyperdas.baseline("mdas", cfg, root / "mdas", progress=records.append)
    h = hyperdas.train(cfg, root / "hyperdas", progress=False)
    return {"mdas": mdas, "hyperdas": h, "records": records, "config": cfg, "root": root}
