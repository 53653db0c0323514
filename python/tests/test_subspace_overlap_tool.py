"""tools/subspace_overlap.py (an analysis script docs/results.md uses) on bases made here."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np

TOOL = Path(__file__).resolve().parents[2] / "tools" / "subspace_overlap.py"


def write_safetensors(path: Path, tensors: dict) -> None:
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        data = np.ascontiguousarray(arr, dtype=np.float32).tobytes()
        header[name] = {"dtype": "F32", "shape": list(arr.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def run_tool(*args):
    return subprocess.run([sys.executable, str(TOOL), *args], capture_output=True, text=True)


def test_overlaps_of_known_subspaces(tmp_path):
    d, k = 12, 3
    eye = np.eye(d, dtype=np.float32)
    a, b = eye[:, 0:3], eye[:, 3:6]  # orthogonal subspaces
    half = eye[:, [0, 1, 6]]  # shares 2 of 3 directions with a
    # rows 0, 1: Country (basis a); rows 2, 3: Continent (basis b)
    bases = np.stack([a, a, b, b])  # [N, D, k]
    (tmp_path / "bases").mkdir()
    write_safetensors(tmp_path / "bases" / "bases.safetensors", {"bases": bases, "rotation": half})
    rows = [{"edit_instruction": f"X ; Y - {attr}"} for attr in ["Country", "Country", "Continent", "Continent"]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for attr, rot in [("Country", a), ("Continent", half)]:
        run = tmp_path / f"mdas-{attr}"
        (run / "checkpoint").mkdir(parents=True)
        (run / "config.resolved.toml").write_text(f'[data]\nattributes = ["{attr}"]\n')
        write_safetensors(run / "checkpoint" / "params.safetensors", {"subspace.rotation": rot})

    out = run_tool("--bases", str(tmp_path / "bases"), "--data", str(tmp_path / "rows.jsonl"),
                   "--mdas", str(tmp_path / "mdas-Country"), "--mdas", str(tmp_path / "mdas-Continent"))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "same attribute 1.000, other attribute 0.000" in text
    assert "HyperDAS Country: with the shared rotation 0.667; with MDAS Country 1.000; with MDAS Continent 0.667; effective rank 3.0" in text
    assert "HyperDAS Continent: with the shared rotation 0.000; with MDAS Country 0.000; with MDAS Continent 0.000" in text
    assert "MDAS Country with MDAS Continent: 0.667" in text


def test_bad_row_is_named(tmp_path):
    (tmp_path / "bases").mkdir()
    eye = np.eye(4, dtype=np.float32)
    write_safetensors(tmp_path / "bases" / "bases.safetensors", {"bases": np.stack([eye[:, :2]] * 2), "rotation": eye[:, :2]})
    (tmp_path / "rows.jsonl").write_text('{"edit_instruction": "X ; Y - Country"}\n{"entity": "Paris"}\n')
    out = run_tool("--bases", str(tmp_path / "bases"), "--data", str(tmp_path / "rows.jsonl"))
    assert out.returncode != 0
    assert "rows.jsonl: row 2" in out.stderr


def test_masked_bases_are_normalised_by_the_columns_they_keep(tmp_path):
    # A MaskSelect run: one rotation R [D, 4], each row's basis R diag(mask).
    d = 8
    r = np.eye(d, dtype=np.float32)[:, :4]
    m_country = np.array([1, 1, 0, 0], dtype=np.float32)  # keeps columns 0, 1
    m_continent = np.array([0, 1, 1, 1], dtype=np.float32)  # keeps 1, 2, 3: shares 1 with Country
    bases = np.stack([r * m_country, r * m_country, r * m_continent])  # [N, D, 4]
    (tmp_path / "bases").mkdir()
    write_safetensors(tmp_path / "bases" / "bases.safetensors", {"bases": bases, "rotation": r})
    rows = [{"edit_instruction": f"X ; Y - {a}"} for a in ["Country", "Country", "Continent"]]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    out = run_tool("--bases", str(tmp_path / "bases"), "--data", str(tmp_path / "rows.jsonl"))
    assert out.returncode == 0, out.stderr
    # same: 2 / √(2·2) = 1; other: 1 / √(2·3); Country with R: 2 / √(2·4); Continent: 3 / √(3·4)
    assert f"same attribute 1.000, other attribute {1 / np.sqrt(6):.3f}" in out.stdout
    assert f"HyperDAS Country: with the shared rotation {2 / np.sqrt(8):.3f}; effective rank 2.0" in out.stdout
    assert f"HyperDAS Continent: with the shared rotation {3 / np.sqrt(12):.3f}; effective rank 3.0" in out.stdout
