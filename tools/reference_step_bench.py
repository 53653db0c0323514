#!/usr/bin/env python3
"""Time the reference implementation's HyperDAS training step on this machine, for comparison
with `hyperdas bench train` (docs/benchmarks.md). Run by hand, never by CI.

The step below is the authors' algorithm as docs/method.md specifies it
(the authors' `LlamaInterpreter.forward` + `run_train`), written against the same
transformers version (4.40.2) and torch (2.4.1), in fp32 on the CPU:

* four target passes: clean base and clean source with all hidden states (no grad), the source
  again for layer l, and the intervened base over all blocks through a forward hook on block
  l-1, with logits at every position;
* the hypernetwork: N blocks (self-attention, cross-attention to the source's and to the base's
  unit-normalised states of every layer, flattened token-major with RoPE at cumsum(M)*M,
  SwiGLU MLP, four RMSNorms) copied from the target's first N blocks, embedding trainable;
* the pointer head with the concatenated pair features `q_combine([h_b; h_s])` over
  [B, T_s, T_b, 2D], the self row, RoPE over the flattened pairs, head-averaged logits;
* ReflectSelect with a [D, k] orthogonal-parametrised basis, the rv MLP of width 14336 (as the
  reference hard-codes it) and materialised [B, D, D] Householder matrices;
* weighted CE (3.5 / 0.5) + the sparsity loss, backward, global clipping at 4.0, AdamW groups.

Weights: an HF export of the same SmolLM2-135M model our benchmark loads:

    cargo run --release --example export_hf -- smollm2-135m /tmp/smollm2-hf
    python3 -m venv /tmp/tv && /tmp/tv/bin/pip install torch==2.4.1 transformers==4.40.2
    /tmp/tv/bin/python tools/reference_step_bench.py /tmp/smollm2-hf --steps 10

Batches have the benchmark's shapes (batch 16, base and source of 30 tokens with some left
padding, instructions of 11 tokens, 3 label tokens); the token ids are random (throughput does
not depend on them).
"""

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, repeat_kv, rotate_half


def rope(x, cos, sin):
    # x [B, H, T, hd]; cos/sin [B, T, hd]
    return x * cos.unsqueeze(1) + rotate_half(x) * sin.unsqueeze(1)


class Attention(nn.Module):
    """A Llama attention module, copied from a target block, used for self- and cross-attention."""

    def __init__(self, src, cfg):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(l.in_features, l.out_features, bias=False) for l in (src.q_proj, src.k_proj, src.v_proj, src.o_proj))
        for dst, s in zip((self.q_proj, self.k_proj, self.v_proj, self.o_proj), (src.q_proj, src.k_proj, src.v_proj, src.o_proj)):
            dst.weight.data.copy_(s.weight.data)
        self.h, self.hkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads

    def forward(self, x, kv, q_cs, k_cs, mask):
        b, tq, _ = x.shape
        tk = kv.shape[1]
        q = self.q_proj(x).view(b, tq, self.h, self.hd).transpose(1, 2)
        k = self.k_proj(kv).view(b, tk, self.hkv, self.hd).transpose(1, 2)
        v = self.v_proj(kv).view(b, tk, self.hkv, self.hd).transpose(1, 2)
        q, k = rope(q, *q_cs), rope(k, *k_cs)
        k, v = repeat_kv(k, self.h // self.hkv), repeat_kv(v, self.h // self.hkv)
        s = q @ k.transpose(2, 3) / self.hd**0.5 + mask
        a = torch.softmax(s.float(), dim=-1).to(q.dtype)
        return self.o_proj((a @ v).transpose(1, 2).reshape(b, tq, -1))


class Block(nn.Module):
    def __init__(self, src, cfg):
        super().__init__()
        self.self_attn, self.src_attn, self.base_attn = Attention(src.self_attn, cfg), Attention(src.self_attn, cfg), Attention(src.self_attn, cfg)
        self.norms = nn.ModuleList(LlamaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps) for _ in range(4))
        for n, s in zip(self.norms, (src.input_layernorm, src.input_layernorm, src.input_layernorm, src.post_attention_layernorm)):
            n.weight.data.copy_(s.weight.data)
        self.mlp = type(src.mlp)(cfg)
        self.mlp.load_state_dict(src.mlp.state_dict())

    def forward(self, x, es, eb, cs, self_mask, ms, mb):
        x = x + self.self_attn(self.norms[0](x), self.norms[0](x), cs["e"], cs["e"], self_mask)
        x = x + self.src_attn(self.norms[1](x), es, cs["e"], cs["s"], ms)
        x = x + self.base_attn(self.norms[2](x), eb, cs["e"], cs["b"], mb)
        return x + self.mlp(self.norms[3](x))


class Interpreter(nn.Module):
    def __init__(self, target, n_blocks, layer, rank):
        super().__init__()
        cfg = target.config
        d = cfg.hidden_size
        self.layer = layer
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.embed.weight.data.copy_(target.model.embed_tokens.weight.data)
        self.blocks = nn.ModuleList(Block(target.model.layers[i], cfg) for i in range(n_blocks))
        self.norm = LlamaRMSNorm(d, cfg.rms_norm_eps)
        self.norm.weight.data.copy_(target.model.norm.weight.data)
        self.rot = LlamaRotaryEmbedding(d // cfg.num_attention_heads, max_position_embeddings=1 << 16, base=cfg.rope_theta)
        h, hkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, d // cfg.num_attention_heads
        self.h, self.hkv, self.hd = h, hkv, hd
        # Pointer head (v/o exist in the reference but are unused; not created).
        self.p_q, self.p_k = nn.Linear(d, h * hd, bias=False), nn.Linear(d, hkv * hd, bias=False)
        self.q_combine = nn.Linear(2 * d, d, bias=False)
        for lin in (self.p_q, self.p_k, self.q_combine):
            nn.init.normal_(lin.weight, std=0.02)
        # ReflectSelect: orthogonal [D, k] basis, rv MLP of width 14336 (the reference's constant).
        self.rotate = nn.utils.parametrizations.orthogonal(nn.Linear(k := rank, d, bias=False))
        self.rv_norm = LlamaRMSNorm(d, cfg.rms_norm_eps)
        self.rv_gate, self.rv_up, self.rv_down = nn.Linear(d, 14336, bias=False), nn.Linear(d, 14336, bias=False), nn.Linear(14336, d, bias=False)
        del k

    def cs(self, pos):
        cos, sin = self.rot(torch.zeros(1), pos)
        return cos, sin

    def forward(self, target, batch):
        xb, ab, ib, xs, as_, is_, ed, em, labels = (batch[k] for k in ("xb", "ab", "ib", "xs", "as", "is", "ed", "em", "labels"))
        l = self.layer
        with torch.no_grad():
            hb_all = torch.stack(target(xb, attention_mask=ab, position_ids=(ab.cumsum(1) * ab - 1).clamp(min=0), output_hidden_states=True).hidden_states, 2)
            hs_all = torch.stack(target(xs, attention_mask=as_, position_ids=(as_.cumsum(1) * as_ - 1).clamp(min=0), output_hidden_states=True).hidden_states, 2)
        b, tb, l1, d = hb_all.shape
        ts = hs_all.shape[1]
        ub, us = hb_all / hb_all.norm(dim=-1, keepdim=True), hs_all / hs_all.norm(dim=-1, keepdim=True)
        eb, es = ub.reshape(b, tb * l1, d), us.reshape(b, ts * l1, d)
        mb, ms = ib.repeat_interleave(l1, 1), is_.repeat_interleave(l1, 1)
        neg = torch.finfo(torch.float32).min
        e_pos = em.cumsum(1)
        cs = {"e": self.cs(e_pos), "b": self.cs(mb.cumsum(1) * mb), "s": self.cs(ms.cumsum(1) * ms)}
        te = ed.shape[1]
        causal = torch.full((te, te), neg).triu(1)
        self_mask = causal[None, None] + (1 - em[:, None, None, :].float()) * neg
        kb_mask, ks_mask = (1 - mb[:, None, None, :].float()) * neg, (1 - ms[:, None, None, :].float()) * neg
        x = self.embed(ed)
        for blk in self.blocks:
            x = blk(x, es, eb, cs, self_mask.clamp(min=neg), ks_mask, kb_mask)
        z = self.norm(x)
        # Pointer head.
        hb, hs = ub[:, :, l], us[:, :, l]
        pairs = self.q_combine(torch.cat([hb[:, None].expand(b, ts, tb, d), hs[:, :, None].expand(b, ts, tb, d)], -1))
        pairs = torch.cat([pairs, hb[:, None]], 1).reshape(b, (ts + 1) * tb, d)
        pm = torch.cat([ib[:, None, :] * is_[:, :, None], torch.ones(b, 1, tb, dtype=ib.dtype)], 1).reshape(b, -1)
        kk = rope(self.p_k(pairs).view(b, -1, self.hkv, self.hd).transpose(1, 2), *self.cs(pm.cumsum(1) * pm))
        kk = repeat_kv(kk, self.h // self.hkv)
        q = rope(self.p_q(z).view(b, te, self.h, self.hd).transpose(1, 2), *self.cs(e_pos * em))[:, :, -1:]
        logits = (q @ kk.transpose(2, 3) / self.hd**0.5 + ((1 - pm[:, None, None, :].float()) * neg)).mean(1)
        w = torch.softmax(logits.reshape(b, ts + 1, tb).float(), dim=1)
        # Source pass again, layer l.
        s = target(xs, attention_mask=as_, output_hidden_states=True).hidden_states[l]
        u = self.rv_down(F.silu(self.rv_gate(self.rv_norm(z[:, -1]))) * self.rv_up(self.rv_norm(z[:, -1])))
        u = u / u.norm(dim=-1, keepdim=True)
        r = self.rotate.weight  # [D, k]
        hh = torch.eye(d)[None] - 2 * u[:, :, None] * u[:, None, :]  # [B, D, D]
        wb = hh @ r  # [B, D, k]

        def hook(module, inputs, output):
            h = output[0]
            m = torch.einsum("bij,bid->bjd", w[:, :ts], s) + w[:, ts, :, None] * h
            new = h + ((m @ wb) - (h @ wb)) @ wb.transpose(1, 2)
            return (new,) + tuple(output[1:])

        handle = target.model.layers[l - 1].register_forward_hook(hook)
        out = target(xb, attention_mask=ab, position_ids=(ab.cumsum(1) * ab - 1).clamp(min=0)).logits  # [B, T, V]
        handle.remove()
        return out, w


def make_batch(cfg, b=16, t=30, te=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = cfg.vocab_size
    lens = [t - (i % 4) for i in range(b)]

    def padded(n_labels=0):
        ids = torch.zeros(b, t, dtype=torch.long)
        att = torch.zeros(b, t, dtype=torch.long)
        inter = torch.zeros(b, t, dtype=torch.long)
        for i, n in enumerate(lens):
            ids[i, t - n :] = torch.randint(1, v, (n,), generator=g)
            att[i, t - n :] = 1
            inter[i, t - n : t - 8] = 1  # the suffix and the labels are not intervenable
        return ids, att, inter

    xb, ab, ib = padded()
    xs, as_, is_ = padded()
    ed = torch.randint(1, v, (b, te), generator=g)
    labels = torch.full((b, t), -100, dtype=torch.long)
    labels[:, -3:] = xb[:, -3:]
    return {"xb": xb, "ab": ab, "ib": ib, "xs": xs, "as": as_, "is": is_, "ed": ed, "em": torch.ones(b, te, dtype=torch.long), "labels": labels, "causal": torch.tensor([i % 2 == 0 for i in range(b)])}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model_dir")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layer", type=int, default=15)
    ap.add_argument("--blocks", type=int, default=2)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = LlamaConfig.from_pretrained(args.model_dir)
    cfg._attn_implementation = "eager"
    target = LlamaForCausalLM(cfg).float().eval()
    state = load_file(f"{args.model_dir}/model.safetensors")
    if cfg.tie_word_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    target.load_state_dict(state)
    for p in target.parameters():
        p.requires_grad_(False)
    interp = Interpreter(target, args.blocks, args.layer, args.rank)
    rot = [p for n, p in interp.named_parameters() if "rotate" in n]
    rest = [p for n, p in interp.named_parameters() if "rotate" not in n]
    opt = torch.optim.AdamW([{"params": rot, "lr": 1e-3, "weight_decay": 0.0}, {"params": rest, "lr": 4e-5, "weight_decay": 0.01}])
    times = []
    for step in range(args.warmup + args.steps):
        batch = make_batch(target.config, seed=step)
        t0 = time.perf_counter()
        logits, w = interp(target, batch)
        lp = F.log_softmax(logits[:, :-1].float(), -1)
        lab = batch["labels"][:, 1:]
        valid = lab != -100
        ce = -lp.gather(-1, lab.clamp(min=0)[..., None])[..., 0]
        wts = torch.where(batch["causal"][:, None], 3.5, 0.5).expand_as(ce)
        loss = (ce * wts)[valid].sum() / valid.sum()
        rs = w[:, :-1].sum(-1)
        loss = loss + 0.83 * (rs * (rs > 1)).sum(-1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(interp.parameters(), 4.0)
        opt.step()
        opt.zero_grad()
        dt = time.perf_counter() - t0
        if step >= args.warmup:
            times.append(dt)
            print(f"step {step - args.warmup + 1}: {dt:.2f} s = {16 / dt:.2f} examples/s (loss {loss.item():.3f})", flush=True)
    med = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(json.dumps({"bench": "reference step (torch)", "torch": torch.__version__, "threads": args.threads, "median_s": med, "min_s": min(times), "max_s": max(times), "examples_per_s": 16 / med, "peak_rss_gb": rss}))


if __name__ == "__main__":
    main()
