"""The original MiniMind LLM written straight from UPSTREAM_FORMAT.md, on the original's weight names.

Slow on purpose: loops over heads and tokens, einsum, nothing shared with minimind_v's code.
`sd` holds float32 tensors named like the original .pth (model.layers.{i}.self_attn.q_proj.weight, ...).
Both generations: "2025" (MiniMind2-V) and "2026" (minimind-3v: eps 1e-6, RMSNorm weighted before the cast,
top-1 MoE without a shared expert; its q/k norms are `qk_norm`, its projector `mlp_projector`).
"""

import math

import torch
import torch.nn.functional as F

# eps, whether RMSNorm multiplies by its weight before casting back, MoE top-k, whether a shared expert runs
GENERATIONS = {"2025": dict(eps=1e-5, weight_first=False, top_k=2, shared=True),
               "2026": dict(eps=1e-6, weight_first=True, top_k=1, shared=False)}


def rmsnorm(x, w, eps=1e-5, weight_first=False):
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (w * normed).type_as(x) if weight_first else w * normed.type_as(x)


def swiglu(x, sd, p):
    return (F.silu(x @ sd[p + "gate_proj.weight"].T) * (x @ sd[p + "up_proj.weight"].T)) @ sd[p + "down_proj.weight"].T


def moe(x, sd, p, n_experts=4, top_k=2, shared=True):
    """Token by token: softmax router, the top-k renormalised (top-1: weight 1), weighted experts (+ shared)."""
    out = torch.zeros_like(x)
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            xt = x[b, t]
            scores = torch.softmax(xt @ sd[p + "gate.weight"].T, -1)
            top = sorted(range(n_experts), key=lambda e: -scores[e].item())[:top_k]
            total = sum(scores[e] for e in top)
            for e in top:
                out[b, t] += scores[e] / total * swiglu(xt, sd, f"{p}experts.{e}.")
            if shared:
                out[b, t] += swiglu(xt, sd, p + "shared_experts.0.")
    return out


def moe_balance_loss_2026(router_logits, coef):
    """minimind-3v's load-balancing loss over all N tokens, top-1: coef * E * sum_e load_e * mean score_e."""
    N, E = router_logits.shape
    scores = torch.softmax(router_logits, -1)
    load = [sum(1 for n in range(N) if int(scores[n].argmax()) == e) / N for e in range(E)]
    return coef * E * sum(load[e] * scores[:, e].mean() for e in range(E))


def yarn_2026_scale(d, theta, orig_max, factor, beta_fast, beta_slow):
    """minimind-3v's YaRN: the half-dimension j's frequency times 1 - r_j + r_j / factor, r a clamped linear ramp
    between the dimensions turning beta_fast and beta_slow times over orig_max positions."""
    def turning(beta):
        return d * math.log(orig_max / (beta * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(turning(beta_fast)), 0), min(math.ceil(turning(beta_slow)), d // 2 - 1)
    ramps = [min(max((j - low) / max(high - low, 0.001), 0.0), 1.0) for j in range(d // 2)]
    return torch.tensor([1 - r + r / factor for r in ramps])


def mlp_projector(features, sd, p="vision_proj.mlp."):
    """minimind-3v's projector: LayerNorm -> Linear -> GELU -> Linear, on the original's keys."""
    h = F.layer_norm(features, features.shape[-1:], sd[p + "0.weight"], sd[p + "0.bias"], eps=1e-5)
    h = F.gelu(h @ sd[p + "1.weight"].T + sd[p + "1.bias"])
    return h @ sd[p + "3.weight"].T + sd[p + "3.bias"]


def logits(sd, n_layers, n_heads, n_kv_heads, ids=None, embeds=None, theta=1e6, use_moe=False, qk_norm=False,
           generation="2025"):
    """Causal forward at positions 0..T-1; `embeds` (B, T, C) replaces the token lookup when given."""
    g = GENERATIONS[generation]
    norm = lambda x, w: rmsnorm(x, w, g["eps"], g["weight_first"])  # noqa: E731
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
        h = norm(x, sd[p + "input_layernorm.weight"])
        q = (h @ sd[p + "self_attn.q_proj.weight"].T).view(B, T, H, d)
        k = (h @ sd[p + "self_attn.k_proj.weight"].T).view(B, T, KV, d)
        v = (h @ sd[p + "self_attn.v_proj.weight"].T).view(B, T, KV, d)
        if qk_norm:
            q, k = norm(q, sd[p + "self_attn.q_norm.weight"]), norm(k, sd[p + "self_attn.k_norm.weight"])
        q, k = rope(q), rope(k)
        out = torch.zeros(B, T, H, d)
        for head in range(H):
            kv = head // (H // KV)
            scores = torch.einsum("bqd,bkd->bqk", q[:, :, head], k[:, :, kv]) / math.sqrt(d)
            scores = scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf"))
            out[:, :, head] = torch.einsum("bqk,bkd->bqd", scores.softmax(-1), v[:, :, kv])
        x = x + out.reshape(B, T, H * d) @ sd[p + "self_attn.o_proj.weight"].T
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        mlp = moe(h, sd, p + "mlp.", top_k=g["top_k"], shared=g["shared"]) if use_moe else swiglu(h, sd, p + "mlp.")
        x = x + mlp
    return norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T
