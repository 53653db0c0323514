"""By-hand check of `hyperdas export pyvene` against pyvene itself (docs/python.md records a run).

Loads a DAS / MDAS export with `pyvene.IntervenableModel.load` on the transformers copy of the
same model, runs pyvene's intervention on test rows (source entity's last token into the base
entity's last token), and compares the next-token distribution after the intervention with
hyperdas's own (`Run.apply`, the same computation in Rust). Needs torch, transformers and
pyvene (not dependencies of hyperdas), and the hyperdas package (`pip install .`).

    python tools/check_pyvene.py --run runs/mdas --export runs/mdas-pyvene \\
        --hf /path/to/hf/model/dir --data data/city_country_test.jsonl --limit 100
"""

import argparse
import importlib.metadata
import json
import sys

import numpy as np
import torch
import pyvene as pv
from transformers import AutoModelForCausalLM

import hyperdas


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", required=True, help="the DAS / MDAS run directory")
    ap.add_argument("--export", required=True, help="its `hyperdas export pyvene` directory")
    ap.add_argument("--hf", required=True, help="an HF directory of the same model, for transformers")
    ap.add_argument("--data", required=True, help="rows to check (JSONL or datasets directory)")
    ap.add_argument("--limit", type=int, default=100)
    a = ap.parse_args()

    run = hyperdas.Run.load(a.run)
    tok = hyperdas.Model.load(run.config["model"]["path"])  # our tokenization (start token included)
    model = AutoModelForCausalLM.from_pretrained(a.hf, torch_dtype=torch.float32).eval()
    im = pv.IntervenableModel.load(a.export, model)
    rows = hyperdas.data.read(a.data)[: a.limit]

    agree, checked, skipped, dp, dlogp = 0, 0, 0, [], []
    for r in rows:
        base, source = r["input_prefix"] + r["input_suffix"], r["counterfactual_input_prefix"] + r["counterfactual_input_suffix"]
        b_ids, s_ids = tok.tokenize(base), tok.tokenize(source)
        b_pre, s_pre = tok.tokenize(r["input_prefix"]), tok.tokenize(r["counterfactual_input_prefix"])
        if b_ids[: len(b_pre)] != b_pre or s_ids[: len(s_pre)] != s_pre:
            skipped += 1  # the entity's last token is not a token boundary of the full prompt
            continue
        pb, ps = len(b_pre) - 1, len(s_pre) - 1
        with torch.no_grad():
            _, out = im(
                {"input_ids": torch.tensor([b_ids])},
                [{"input_ids": torch.tensor([s_ids])}],
                unit_locations={"sources->base": ([[[ps]]], [[[pb]]])},
            )
        p_theirs = torch.softmax(out.logits[0, -1].float(), -1).numpy()
        ours = run.apply(base, source, r["edit_instruction"], top=5, base_entity=r["entity"], source_entity=r["counterfactual_entity"])
        top_ours, p_ours = ours["after"][0]
        top_theirs = tok.decode([int(p_theirs.argmax())])
        agree += int(top_ours == top_theirs)
        checked += 1
        # Our top-5 tokens' probabilities against pyvene's for the same tokens.
        for t, p in ours["after"]:
            ids = tok.tokenize(t, prompt=False)
            if len(ids) == 1:
                dp.append(abs(p - float(p_theirs[ids[0]])))
                dlogp.append(abs(np.log(max(p, 1e-30)) - np.log(max(float(p_theirs[ids[0]]), 1e-30))))
    report = {
        "rows_checked": checked,
        "rows_skipped_token_boundary": skipped,
        "top1_agreement": agree / max(checked, 1),
        "max_abs_prob_diff_top5": float(max(dp)) if dp else None,
        "max_abs_logprob_diff_top5": float(max(dlogp)) if dlogp else None,
        "pyvene": importlib.metadata.version("pyvene"),
        "transformers": importlib.metadata.version("transformers"),
        "torch": torch.__version__,
    }
    print(json.dumps(report, indent=2))
    return 0 if checked and agree == checked else 1


if __name__ == "__main__":
    sys.exit(main())
