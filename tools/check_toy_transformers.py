"""Check that transformers loads a `hyperdas toy` directory and agrees with hyperdas.

    python tools/check_toy_transformers.py ~/.cache/hyperdas/toy/<key>

Loads the directory with AutoTokenizer / AutoModelForCausalLM, recomputes first-token accuracy
per attribute on the training and held-out templates (world.json), and compares it with the
numbers hyperdas wrote to toy.json. Also checks that token ids match hyperdas' tokenizer rule
(one <|begin_of_text|>, prompt words, value words).
"""
import json
import sys
from pathlib import Path

import torch
import transformers


def main():
    d = Path(sys.argv[1])
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    world = json.load(open(d / "world.json"))
    report = json.load(open(d / "toy.json"))
    attrs = world["attributes"]
    worst = 0.0
    for train in (True, False):
        hit = [0] * len(attrs)
        total = [0] * len(attrs)
        for tpl in world["templates"]:
            if tpl["train"] != train:
                continue
            a = tpl["attribute"]
            prompts, firsts = [], []
            for name, values in world["cities"]:
                prompt = tpl["text"].replace("%s", name, 1)
                sep = "" if prompt.endswith((" ", '"', "'", "(")) else " "
                ids = tok(prompt)["input_ids"]  # the post-processor adds <|begin_of_text|>
                full = tok(prompt + sep + values[a])["input_ids"]
                assert full[: len(ids)] == ids, (prompt, values[a])
                prompts.append(ids)
                firsts.append(full[len(ids)])
            for ids, first in zip(prompts, firsts):
                with torch.no_grad():
                    logits = model(torch.tensor([ids])).logits[0, -1]
                hit[a] += int(int(logits.argmax()) == first)
                total[a] += 1
        for i, name in enumerate(attrs):
            ours = report["accuracy"][i]["train" if train else "held_out"]
            theirs = hit[i] / total[i]
            worst = max(worst, abs(ours - theirs))
            print(f"{'train' if train else 'held-out':8} {name:10} transformers {theirs:.4f}  hyperdas {ours:.4f}")
    print(f"largest difference: {worst:.4f}")
    assert worst < 0.005, "transformers and hyperdas disagree"


if __name__ == "__main__":
    main()
