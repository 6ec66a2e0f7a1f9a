"""The original MiniMind LLM written straight from UPSTREAM_FORMAT.md, on the original's weight names.

Slow on purpose: loops over heads and tokens, einsum, nothing shared with minimind_v's code.
`sd` holds float32 tensors named like the original .pth (model.layers.{i}.self_attn.q_proj.weight, ...).
"""

import math

import torch
import torch.nn.functional as F


def rmsnorm(x, w, eps=1e-5):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).type_as(x)


def swiglu(x, sd, p):
    return (F.silu(x @ sd[p + "gate_proj.weight"].T) * (x @ sd[p + "up_proj.weight"].T)) @ sd[p + "down_proj.weight"].T


def moe(x, sd, p, n_experts=4):
    """Token by token: softmax router, top-2 renormalised, weighted experts + the shared expert."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            xt = x[b, t]
            scores = torch.softmax(xt @ sd[p + "gate.weight"].T, -1)
            top = sorted(range(n_experts), key=lambda e: -scores[e].item())[:2]
            total = sum(scores[e] for e in top)
            for e in top:
                out[b, t] += scores[e] / total * swiglu(xt, sd, f"{p}experts.{e}.")
            out[b, t] += swiglu(xt, sd, p + "shared_experts.0.")
    return out


def logits(sd, n_layers, n_heads, n_kv_heads, ids=None, embeds=None, theta=1e6, use_moe=False, qk_norm=False):
    """Causal forward at positions 0..T-1; `embeds` (B, T, C) replaces the token lookup when given."""
    x = sd["model.embed_tokens.weight"][ids] if embeds is None else embeds
    B, T, C = x.shape
    H, KV, d = n_heads, n_kv_heads, C // n_heads
    f = torch.tensor([1.0 / theta ** (2 * j / d) for j in range(d // 2)])
    ang = torch.arange(T).float()[:, None] * f[None]
    cos, sin = torch.cat([ang.cos(), ang.cos()], -1), torch.cat([ang.sin(), ang.sin()], -1)

    def rope(x):  # (B, T, heads, d), rotate-half layout
        rot = torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1)
        return x * cos[None, :, None] + rot * sin[None, :, None]

    for i in range(n_layers):
        p = f"model.layers.{i}."
        h = rmsnorm(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, H, d)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, KV, d)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, KV, d)
        if qk_norm:
            q, k = rmsnorm(q, sd[p + "self_attn.q_norm.weight"]), rmsnorm(k, sd[p + "self_attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        out = torch.zeros(B, T, H, d)
        for head in range(H):
            kv = head // (H // KV)
            scores = torch.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv]) / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            out[:, :, head] = torch.einsum("bqk,bkd->bqd", scores.softmax(-1), v[:, :, kv])
        x = x + out.reshape(B, T, H * d) @ sd[p + "self_attn.o_proj.weight"].T
        h = rmsnorm(x, sd[p + "post_attention_layernorm.weight"])
        x = x + (moe(h, sd, p + "mlp.") if use_moe else swiglu(h, sd, p + "mlp."))
    return rmsnorm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T
