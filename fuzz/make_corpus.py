#!/usr/bin/env python3
"""Write the seed corpora under fuzz/corpus/ (small, committed). Standard library only.

    python3 fuzz/make_corpus.py

Seeds are valid inputs the fuzzer mutates: small files copied from tests/fixtures and configs/,
and a few written here (a 1-block Llama and Gemma 3 GGUF with a SentencePiece vocabulary, a
safetensors checkpoint for the targets' tiny config, an index for the shard they provide).
"""

import json
import shutil
import struct
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"
OUT = ROOT / "fuzz" / "corpus"


def put(target, name, data):
    d = OUT / target
    d.mkdir(parents=True, exist_ok=True)
    (d / name).write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))


def copy(target, src, name=None):
    put(target, name or src.name, src.read_bytes())


# --- safetensors ---------------------------------------------------------------------------

def safetensors(tensors):
    """tensors: {name: (dtype, shape, [floats])}, F32 only."""
    header, blobs, off = {}, [], 0
    for name, (shape, values) in tensors.items():
        b = b"".join(struct.pack("<f", v) for v in values)
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [off, off + len(b)]}
        blobs.append(b)
        off += len(b)
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * ((8 - len(h) % 8) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def tiny_llama_tensors(v=16, d=8, f=16, heads=2, kv=1):
    hd = d // heads
    t = {"model.embed_tokens.weight": ([v, d], [0.01 * i for i in range(v * d)]),
         "model.norm.weight": ([d], [1.0] * d)}
    p = "model.layers.0"
    for name, shape in [("input_layernorm", [d]), ("post_attention_layernorm", [d]),
                        ("self_attn.q_proj", [heads * hd, d]), ("self_attn.k_proj", [kv * hd, d]),
                        ("self_attn.v_proj", [kv * hd, d]), ("self_attn.o_proj", [d, heads * hd]),
                        ("mlp.gate_proj", [f, d]), ("mlp.up_proj", [f, d]), ("mlp.down_proj", [d, f])]:
        n = 1
        for s in shape:
            n *= s
        t[f"{p}.{name}.weight"] = (shape, [((i * 7) % 13 - 6) * 0.05 for i in range(n)])
    return t


# --- GGUF ----------------------------------------------------------------------------------

U32, I32, F32, BOOL, STR, ARR, U64 = 4, 5, 6, 7, 8, 9, 10


def gs(s):
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def kv(key, ty, val):
    out = gs(key) + struct.pack("<I", ty)
    if ty == U32:
        out += struct.pack("<I", val)
    elif ty == F32:
        out += struct.pack("<f", val)
    elif ty == BOOL:
        out += struct.pack("<?", val)
    elif ty == STR:
        out += gs(val)
    elif ty == ARR:
        ety, items = val
        out += struct.pack("<IQ", ety, len(items))
        for it in items:
            out += gs(it) if ety == STR else struct.pack({F32: "<f", I32: "<i"}[ety], it)
    return out


def gguf(arch, meta, tensors):
    """tensors: [(name, shape (ggml order), floats)], F32 data."""
    kvs = b"".join(kv(*m) for m in [("general.architecture", STR, arch)] + meta)
    infos, data, off = b"", b"", 0
    for name, shape, values in tensors:
        infos += gs(name) + struct.pack("<I", len(shape)) + b"".join(struct.pack("<Q", s) for s in shape)
        infos += struct.pack("<IQ", 0, off)  # type 0 = F32
        blob = b"".join(struct.pack("<f", v) for v in values)
        blob += b"\0" * ((32 - len(blob) % 32) % 32)
        data += blob
        off += len(blob)
    head = b"GGUF" + struct.pack("<IQQ", 3, len(tensors), 1 + len(meta)) + kvs + infos
    head += b"\0" * ((32 - len(head) % 32) % 32)
    return head + data


def spm_vocab():
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>", "▁", "a", "i", "P", "r", "s", "▁P", "ar", "is", "▁is", "\n", "  "]
    types = [3, 3, 3, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 4, 4]
    scores = [-1000.0] * 4 + [-float(i) for i in range(4, 14)] + [-1000.0, -1000.0]
    return [("tokenizer.ggml.model", STR, "llama"), ("tokenizer.ggml.tokens", ARR, (STR, tokens)),
            ("tokenizer.ggml.scores", ARR, (F32, scores)), ("tokenizer.ggml.token_type", ARR, (I32, types)),
            ("tokenizer.ggml.bos_token_id", U32, 2), ("tokenizer.ggml.eos_token_id", U32, 1),
            ("tokenizer.ggml.padding_token_id", U32, 0), ("tokenizer.ggml.add_bos_token", BOOL, True)]


def tiny_gguf(arch):
    v, d, f = 16, 8, 16
    meta = [(f"{arch}.block_count", U32, 1), (f"{arch}.context_length", U32, 64),
            (f"{arch}.embedding_length", U32, d), (f"{arch}.feed_forward_length", U32, f),
            (f"{arch}.attention.head_count", U32, 2), (f"{arch}.attention.head_count_kv", U32, 1),
            (f"{arch}.attention.layer_norm_rms_epsilon", F32, 1e-6), (f"{arch}.rope.freq_base", F32, 10000.0)]
    if arch == "gemma3":
        meta += [("gemma3.attention.key_length", U32, 4), ("gemma3.attention.value_length", U32, 4),
                 ("gemma3.attention.sliding_window", U32, 4)]
    meta += spm_vocab()
    names = ["attn_norm", "ffn_norm"] + (["post_attention_norm", "post_ffw_norm"] if arch == "gemma3" else [])
    ts = [("token_embd.weight", [d, v], [0.01 * i for i in range(v * d)]), ("output_norm.weight", [d], [1.0] * d)]
    ts += [(f"blk.0.{n}.weight", [d], [1.0] * d) for n in names]
    if arch == "gemma3":
        ts += [("blk.0.attn_q_norm.weight", [4], [1.0] * 4), ("blk.0.attn_k_norm.weight", [4], [1.0] * 4)]
    for n, rows, cols in [("attn_q", 8, d), ("attn_k", 4, d), ("attn_v", 4, d), ("attn_output", d, 8),
                          ("ffn_gate", f, d), ("ffn_up", f, d), ("ffn_down", d, f)]:
        ts.append((f"blk.0.{n}.weight", [cols, rows], [((i * 5) % 11 - 5) * 0.05 for i in range(rows * cols)]))
    return gguf(arch, meta, ts)


def main():
    if OUT.exists():
        shutil.rmtree(OUT)
    for name in ["tiny-llama", "tiny-qwen2", "tiny-gemma3"]:
        copy("config_json", FIX / name / "config.json", f"{name}.json")
    copy("config_json", FIX / "tiny-gemma3-variant-config.json")
    put("safetensors", "tiny-llama.safetensors", safetensors(tiny_llama_tensors()))
    put("safetensors", "empty.safetensors", struct.pack("<Q", 2) + b"{}")
    put("safetensors_index", "index.json", json.dumps({"metadata": {"total_size": 24},
        "weight_map": {"a": "model-00001-of-00001.safetensors", "b": "model-00001-of-00001.safetensors"}}))
    put("gguf", "tiny-llama.gguf", tiny_gguf("llama"))
    put("gguf", "tiny-gemma3.gguf", tiny_gguf("gemma3"))
    copy("gguf", FIX / "spm-tokenizer.gguf")
    copy("tokenizer_json", FIX / "tiny-llama" / "tokenizer.json", "byte-level-bpe.json")
    lines = (FIX / "ravel" / "city_country_test.jsonl").read_text(encoding="utf-8").splitlines()
    put("jsonl", "rows.jsonl", "\n".join(lines[:4]) + "\n")
    put("jsonl", "one.jsonl", lines[0] + "\n")
    copy("arrow", FIX / "ravel" / "city_country_test" / "data-00000-of-00001.arrow", "city_country_test.arrow")
    for cfg in ["toy.toml", "smollm2-city.toml"]:
        copy("toml_config", ROOT / "configs" / cfg)
    put("toml_config", "sets.toml", '[model]\npath = "toy"\n[train]\nlr = 1e-4\nepochs = 2\n[interpreter]\nmethod = "mdas"\nlayer = "middle"\n')
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(f"wrote {sum(1 for p in OUT.rglob('*') if p.is_file())} seeds, {total} bytes, to {OUT}")


if __name__ == "__main__":
    main()
