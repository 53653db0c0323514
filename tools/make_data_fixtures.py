"""Data fixtures for tests/data.rs (run from the repository root, in the venv of tools/requirements.txt).

    cargo run --release -- data build --no-filter --split test --causal 24 --isolate 5 --seed 7 \
        --out tests/fixtures/ravel && rm tests/fixtures/ravel/*.summary.json
    python tools/make_data_fixtures.py \
        [--smollm2-gguf ~/.cache/hyperdas/models/smollm2-135m/SmolLM2-135M-Instruct.Q4_1.gguf]

Writes, from tests/fixtures/ravel/city_country_test.jsonl (49 rows our generator made; RAVEL
facts, MIT):
  ravel/city_country_test/         the same rows saved by HF `datasets` (`save_to_disk`), i.e. the
                                   directory format the reference ships (Arrow IPC stream shard,
                                   dataset_info.json, state.json)
  ravel/smollm2-filter-expected.json  for each row, whether SmolLM2-135M (transformers, f32),
                                   teacher-forced on BOS + verify_text + [" "] + label, predicts
                                   every label token, computed the reference's way
                                   (`filter_dataset`: label tokens = full tokens after
                                   len(tokenize(prompt))), plus the smallest logit margin
"""
import argparse
import json
from pathlib import Path

ROOT = Path("tests/fixtures/ravel")


def rows():
    return [json.loads(l) for l in open(ROOT / "city_country_test.jsonl", encoding="utf-8") if l.strip()]


def arrow_dir():
    import datasets

    rs = rows()
    ds = datasets.Dataset.from_dict({k: [r[k] for r in rs] for k in rs[0]})
    ds.save_to_disk(str(ROOT / "city_country_test"))
    # Check the round trip through datasets itself.
    back = datasets.load_from_disk(str(ROOT / "city_country_test"))
    assert back.to_list() == rs


def smollm2_filter(gguf: Path):
    import torch
    import transformers

    d = str(gguf.parent)
    tok = transformers.AutoTokenizer.from_pretrained(d, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf.name, dtype=torch.float32).eval()
    start = [0]  # <|endoftext|>: hyperdas' SmolLM2 start-token rule (docs/models.md)
    out = []
    for r in rows():
        label = r["counterfactual_target"] if r["attribute_type"] == "causal" else r["target"]
        prompt = r["verify_text"]
        sep = "" if prompt.endswith((" ", '"', "'", "(")) else " "
        full = start + tok(prompt + sep + label, add_special_tokens=False)["input_ids"]
        n_prompt = len(start + tok(prompt, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            logits = model(torch.tensor([full])).logits[0]
        ok, margin = True, float("inf")
        for p in range(n_prompt, len(full)):
            row = logits[p - 1]
            target = full[p]
            other = torch.cat([row[:target], row[target + 1:]]).max()
            margin = min(margin, abs(float(row[target] - other)))
            ok &= int(row.argmax()) == target
        out.append({"pass": bool(ok), "margin": margin, "label_tokens": len(full) - n_prompt})
    json.dump(out, open(ROOT / "smollm2-filter-expected.json", "w"), indent=1)
    print(f"{sum(o['pass'] for o in out)} of {len(out)} rows pass")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smollm2-gguf", type=Path)
    a = ap.parse_args()
    arrow_dir()
    if a.smollm2_gguf:
        smollm2_filter(a.smollm2_gguf)


if __name__ == "__main__":
    main()
