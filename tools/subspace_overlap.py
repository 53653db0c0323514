"""How much the subspaces of two attributes share, for HyperDAS and for per-attribute MDAS.

The overlap of two rank-k bases A, B [D, k] with orthonormal columns is ‖Aᵀ B‖²_F / k: 1 for the
same subspace, k / D on average for random ones, 0 for orthogonal ones. For a HyperDAS run this
script reads the per-row bases that `hyperdas export pyvene --run RUN --out DIR --limit N` writes
(`DIR/bases.safetensors`: `bases` [N, D, k], the shared `rotation` [D, k]) and the data rows they
belong to, groups the rows by the attribute of their edit instruction ("… - Country"), and prints
the mean overlap of two rows' bases for the same and for another attribute, and of each
attribute's bases with the shared rotation. Given MDAS run directories (one per attribute, as
`hyperdas sweep --methods mdas --grid attribute=…` writes them) it prints the overlap of their
rotations, and of each HyperDAS attribute's bases with each MDAS rotation. A MaskSelect run's
bases are its rotation times each row's mask (columns scaled by it): the overlap is then
normalised by the bases' own norms (`overlap`), and the effective rank printed per attribute is
the number of columns the mask keeps. docs/results.md records runs. Needs numpy only.

    hyperdas export pyvene --run runs/gemma3-hyperdas/runs/hyperdas-seed0 --out bases0 --limit 64
    python tools/subspace_overlap.py --bases bases0 --data data/gemma3/city_country+continent_test.jsonl \\
        --mdas runs/gemma3-mdas500/runs/mdas-attributeCountry-seed0 \\
        --mdas runs/gemma3-mdas500/runs/mdas-attributeContinent-seed0
"""

import argparse
import itertools
import json
import struct
import sys
from pathlib import Path

import numpy as np


def load_safetensors(path: Path) -> dict:
    """The F32 tensors of a safetensors file, as numpy arrays (no safetensors package needed)."""
    if not path.is_file():
        raise SystemExit(f"{path}: no such file")
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    out = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] != "F32":
            raise SystemExit(f"{path}: tensor {name} is {meta['dtype']}, expected F32")
        start, end = meta["data_offsets"]
        data = raw[8 + header_len + start : 8 + header_len + end]
        out[name] = np.frombuffer(data, dtype=np.float32).reshape(meta["shape"])
    return out


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    """‖aᵀ b‖²_F / √(‖aᵀ a‖²_F ‖bᵀ b‖²_F) for a [D, k], b [D, k']: ‖aᵀ b‖²_F / k for two
    rank-k bases with orthonormal columns. A MaskSelect basis `R diag(m)` has columns of length
    m_i; with a mask of 0s and 1s this is the overlap of the selected columns' spans: s / √(n_a n_b)
    for n_a and n_b selected columns of one rotation, s of them shared."""
    return float(((a.T @ b) ** 2).sum() / np.sqrt(((a.T @ a) ** 2).sum() * ((b.T @ b) ** 2).sum()))


def effective_rank(a: np.ndarray) -> float:
    """‖a‖²_F: k for orthonormal columns, the number of selected columns for a 0/1 mask."""
    return float((a**2).sum())


def instruction_attribute(row: dict, where: str) -> str:
    instruction = row.get("edit_instruction")
    if not isinstance(instruction, str) or " - " not in instruction:
        raise SystemExit(f"{where}: no edit_instruction of the form 'A ; B - Attribute'")
    return instruction.rsplit(" - ", 1)[1].strip()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--bases", required=True, help="a `hyperdas export pyvene` directory of a HyperDAS run")
    ap.add_argument("--data", required=True, help="the JSONL the bases were computed for (the run's data.test unless --data was given to export)")
    ap.add_argument("--mdas", action="append", default=[], help="an MDAS run directory (repeat, one per attribute)")
    args = ap.parse_args()

    bases_path = Path(args.bases) / "bases.safetensors"
    tensors = load_safetensors(bases_path)
    if "bases" not in tensors or "rotation" not in tensors:
        raise SystemExit(f"{bases_path}: expected tensors 'bases' and 'rotation' (a HyperDAS export)")
    bases, shared = tensors["bases"], tensors["rotation"]  # [N, D, k], [D, k]
    n = bases.shape[0]

    attrs = []
    with open(args.data, encoding="utf-8") as f:
        for i, line in zip(range(n), f):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{args.data}: row {i + 1}: {e}")
            attrs.append(instruction_attribute(row, f"{args.data}: row {i + 1}"))
    if len(attrs) < n:
        raise SystemExit(f"{args.data}: {len(attrs)} rows, but {bases_path} has {n} bases")
    names = sorted(set(attrs))

    mdas = {}
    for run in args.mdas:
        cfg = Path(run) / "config.resolved.toml"
        params = Path(run) / "checkpoint" / "params.safetensors"
        if not cfg.is_file():
            raise SystemExit(f"{cfg}: no such file (not a run directory?)")
        # `attributes = [...]` as hyperdas writes it: a list of plain strings, which is also JSON.
        line = next((l for l in cfg.read_text(encoding="utf-8").splitlines() if l.startswith("attributes = [")), None)
        if line is None:
            raise SystemExit(f"{cfg}: no data.attributes line")
        try:
            attributes = json.loads(line.split("=", 1)[1])
        except json.JSONDecodeError as e:
            raise SystemExit(f"{cfg}: data.attributes is not a list of strings: {e}")
        rot = load_safetensors(params).get("subspace.rotation")
        if rot is None:
            raise SystemExit(f"{params}: no subspace.rotation (not a DAS / MDAS run?)")
        mdas[", ".join(attributes) or run] = rot

    same, other = [], []
    for i, j in itertools.combinations(range(n), 2):
        (same if attrs[i] == attrs[j] else other).append(overlap(bases[i], bases[j]))
    k, d = shared.shape[1], shared.shape[0]
    print(f"{bases_path}: {n} rows ({', '.join(f'{a} {attrs.count(a)}' for a in names)}), rank {k} of {d} (random subspaces: {k / d:.3f})")
    print(f"HyperDAS, two rows' bases: same attribute {np.mean(same):.3f}, other attribute {np.mean(other) if other else float('nan'):.3f}")
    for a in names:
        rows = [i for i in range(n) if attrs[i] == a]
        line = f"HyperDAS {a}: with the shared rotation {np.mean([overlap(bases[i], shared) for i in rows]):.3f}"
        for b, rot in mdas.items():
            line += f"; with MDAS {b} {np.mean([overlap(bases[i], rot) for i in rows]):.3f}"
        line += f"; effective rank {np.mean([effective_rank(bases[i]) for i in rows]):.1f}"
        print(line)
    for (a, ra), (b, rb) in itertools.combinations(mdas.items(), 2):
        print(f"MDAS {a} with MDAS {b}: {overlap(ra, rb):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
