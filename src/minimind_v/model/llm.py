"""MiniMindLM: the original MiniMind decoder, numerics as in docs UPSTREAM_FORMAT.

Pre-norm blocks (RMSNorm, eps in float32), RoPE base 1e6 in the rotate-half layout (+ optional
YaRN), grouped-query attention on SDPA (+ per-head q/k RMSNorm), SwiGLU or a mixture of SwiGLU
experts, tied embeddings. Both generations: LMConfig.numerics picks where their code differs.
Attention handles plain causal, left padding (attention_mask), packing (segment_ids) and a KV
cache given as a list of (k, v) per layer, each (B, kv_heads, T_total, head_dim).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minimind_v.constants import IGNORE_INDEX
from minimind_v.model.config import LMConfig

KVCache = list[tuple[Tensor, Tensor]]


@dataclass
class CausalLMOutput:
    logits: Tensor | None
    """(B, T, vocab), the last k positions for an int logits_to_keep, None for logits_to_keep="none"."""
    loss: Tensor | None
    """Mean cross-entropy over supervised tokens (+ MoE aux loss in training); None without labels."""
    aux_loss: Tensor
    """MoE load-balancing loss summed over layers; 0 for a dense model or in eval mode."""
    num_loss_tokens: Tensor
    """Number of supervised tokens (labels != -100 after the shift)."""
    past_key_values: KVCache | None
    """Per layer (k, v), each (B, kv_heads, T_total, head_dim); None unless use_cache."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, weight_in_float32: bool = False):
        super().__init__()
        self.eps, self.weight_in_float32 = eps, weight_in_float32
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in float32 even under bf16, then each original's own order: the 2025 code casts back and then
        # multiplies by the weight, the 2026 code multiplies in float32 and casts last (they differ under bf16).
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_float32:
            return (self.weight * normed).type_as(x)
        return self.weight * normed.type_as(x)


def rms_norm(dim: int, cfg: LMConfig) -> RMSNorm:
    return RMSNorm(dim, cfg.rms_norm_eps, weight_in_float32=cfg.numerics == "2026")


def rope_frequencies(cfg: LMConfig) -> Tensor:
    """Half-dimension inverse frequencies (d/2,), YaRN-scaled the original's way when configured."""
    d = cfg.head_dim
    freqs = 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    scaling = cfg.rope_scaling
    if scaling is None:
        return freqs
    if cfg.numerics == "2026":
        return freqs * yarn_ramp(d, cfg.rope_theta, scaling)
    orig_max = scaling.get("original_max_position_embeddings", 2048)
    factor = scaling.get("factor", 4)
    beta_fast, beta_slow = scaling.get("beta_fast", 4.0), scaling.get("beta_slow", 1.0)
    if cfg.max_position_embeddings / orig_max <= 1.0:
        return freqs  # the model never sees a position beyond what it was trained on
    half = d // 2
    corr_dim = next((i for i in range(half) if 2 * math.pi / freqs[i] > orig_max), half)
    power = torch.arange(half).float() / max(half - 1, 1)
    beta = beta_slow + (beta_fast - beta_slow) * power
    scale = torch.where(torch.arange(half) < corr_dim, (beta * factor - beta + 1) / (beta * factor), 1.0 / factor)
    return freqs * scale


def yarn_ramp(d: int, theta: float, scaling: dict) -> Tensor:
    """The 2026 original's YaRN (d/2,) frequency scale: 1 on the fast dimensions, 1/factor on the slow ones, a
    linear ramp between the dimensions that turn beta_fast and beta_slow times over the original length."""
    orig_max = scaling.get("original_max_position_embeddings", 2048)
    factor = scaling.get("factor", 16)
    beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

    def dim_turning(turns: float) -> float:
        return d * math.log(orig_max / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim_turning(beta_fast)), 0), min(math.ceil(dim_turning(beta_slow)), d // 2 - 1)
    ramp = ((torch.arange(d // 2).float() - low) / max(high - low, 0.001)).clamp(0, 1)
    return 1 - ramp + ramp / factor


def rope_tables(cfg: LMConfig) -> tuple[Tensor, Tensor]:
    """cos and sin, each (max_position_embeddings, head_dim) in the rotate-half layout."""
    t = torch.arange(cfg.max_position_embeddings).float()
    angles = torch.outer(t, rope_frequencies(cfg))  # (L, d/2)
    cos, sin = torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)
    if cfg.numerics == "2026" and cfg.rope_scaling is not None:
        scale = cfg.rope_scaling.get("attention_factor", 1.0)
        return cos * scale, sin * scale
    return cos, sin


def rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x (B, H, T, D); cos, sin (B, T, D) gathered at each token's position. The rotation runs in
    # float32 (as the original's fp32 tables promote it under autocast), then back to x's dtype.
    xf = x.float()
    return (xf * cos.unsqueeze(1).float() + rotate_half(xf) * sin.unsqueeze(1).float()).type_as(x)


class Attention(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.hidden_size, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.hidden_size, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.q_norm = rms_norm(self.head_dim, cfg) if cfg.qk_norm else None
        self.k_norm = rms_norm(self.head_dim, cfg) if cfg.qk_norm else None
        if self.q_norm is not None and self.k_norm is not None:
            nn.init.constant_(self.q_norm.weight, cfg.qk_norm_gain)
            nn.init.constant_(self.k_norm.weight, cfg.qk_norm_gain)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)  # (B, KV, T_total, D)
        # Without a mask or cache the fast is_causal path applies; otherwise `mask` says it all. A branch, not an
        # expression: under torch.compile T may be a symbol, and SDPA takes only a plain bool.
        causal = False
        if mask is None and past is None and T > 1:
            causal = True
        # enable_gqa: each KV head serves its group of query heads inside the kernel (repeating K and V copies).
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0, is_causal=causal,
            enable_gqa=self.n_heads != self.n_kv_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), (k, v)


class FeedForward(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inner: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Softmax router, top-k routed SwiGLU experts (weights renormalised) plus shared experts."""

    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.top_k, self.n_experts = cfg.num_experts_per_tok, cfg.n_routed_experts
        self.alpha, self.seq_aux = cfg.aux_loss_alpha, cfg.seq_aux
        # The 2025 original leaves a top-1 weight as its score; the 2026 one divides it by itself (weight 1).
        self.renormalise = cfg.norm_topk_prob and (self.top_k > 1 or cfg.numerics == "2026")
        self.router = nn.Linear(cfg.hidden_size, self.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(cfg.hidden_size, cfg.ffn_size) for _ in range(self.n_experts))
        self.shared_experts = nn.ModuleList(
            FeedForward(cfg.hidden_size, cfg.ffn_size) for _ in range(cfg.n_shared_experts))

    def route(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, T, C) -> top-k expert ids (B*T, k), their weights (B*T, k), router scores (B, T, E)."""
        scores = self.router(x).softmax(dim=-1)  # (B, T, E)
        weights, experts = torch.topk(scores.view(-1, self.n_experts), k=self.top_k, dim=-1, sorted=False)
        if self.renormalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return experts, weights, scores

    def balance_loss(self, experts: Tensor, scores: Tensor) -> Tensor:
        """The original's load-balancing loss; `experts` (B*T, k), `scores` (B, T, E)."""
        B, T, E = scores.shape
        chosen = experts.view(B, -1)  # (B, T*k)
        if self.seq_aux:
            # c[b, e]: how often sequence b picked expert e, relative to a uniform share T*k/E
            ones = torch.ones_like(chosen, dtype=scores.dtype)
            counts = torch.zeros(B, E, dtype=scores.dtype, device=scores.device).scatter_add_(1, chosen, ones)
            counts = counts / (T * self.top_k / E)
            return self.alpha * (counts * scores.mean(dim=1)).sum(dim=1).mean()
        share = F.one_hot(chosen.reshape(-1), E).to(scores.dtype).mean(0)  # (E,) fraction of picks
        return self.alpha * (share * E * scores.view(-1, E).mean(0)).sum()

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        B, T, C = x.shape
        experts, weights, scores = self.route(x)
        flat = x.reshape(-1, C)  # (B*T, C)
        y = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            # Every expert runs, even on zero tokens, so all of them get a gradient (DDP wants that).
            token, slot = torch.where(experts == e)
            out = expert(flat[token]) * weights[token, slot, None]
            y = y.index_add(0, token, out.to(y.dtype))
        y = y.view(B, T, C)
        for shared in self.shared_experts:
            y = y + shared(x)
        if self.training and self.alpha > 0:
            return y, self.balance_loss(experts, scores)
        return y, x.new_zeros(())


class Block(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.attn_norm = rms_norm(cfg.hidden_size, cfg)
        self.attn = Attention(cfg)
        self.mlp_norm = rms_norm(cfg.hidden_size, cfg)
        self.mlp = MoEFeedForward(cfg) if cfg.use_moe else FeedForward(cfg.hidden_size, cfg.ffn_size)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
                past: tuple[Tensor, Tensor] | None) -> tuple[Tensor, tuple[Tensor, Tensor], Tensor | None]:
        a, kv = self.attn(self.attn_norm(x), cos, sin, mask, past)
        h = x + a
        if isinstance(self.mlp, MoEFeedForward):
            m, aux = self.mlp(self.mlp_norm(h))
            return h + m, kv, aux
        return h + self.mlp(self.mlp_norm(h)), kv, None


def default_positions(T: int, past_len: int, attention_mask: Tensor | None, segment_ids: Tensor | None,
                      device: torch.device) -> Tensor:
    """Positions (B or 1, T) when the caller gives none.

    Left padding: count only real tokens, so a padded row sees the positions of its unpadded self.
    Packing: restart at 0 where the segment id changes.
    """
    if attention_mask is not None:
        return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
    idx = torch.arange(past_len, past_len + T, device=device)[None]  # (1, T)
    if segment_ids is None:
        return idx
    change = torch.ones_like(segment_ids, dtype=torch.bool)
    change[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    starts = torch.where(change, idx, torch.zeros_like(idx)).cummax(dim=-1).values
    return idx - starts


def attention_bias(T: int, past_len: int, attention_mask: Tensor | None, segment_ids: Tensor | None,
                   device: torch.device) -> Tensor | None:
    """Boolean (B or 1, 1, T, T_past + T) mask of allowed keys, or None when plain causal suffices."""
    if attention_mask is None and segment_ids is None and (past_len == 0 or T == 1):
        return None  # plain causal, or one new token that may see the whole cache
    S = past_len + T
    q_pos = torch.arange(past_len, S, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(S, device=device)[None, :]  # (1, S)
    allowed = (k_pos <= q_pos)[None]  # (1, T, S)
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    if segment_ids is not None:
        if past_len:
            raise ValueError("segment_ids (packing) cannot be combined with a KV cache")
        same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
        allowed = allowed & same & (segment_ids[:, None, :] > 0)
    # A token always sees itself, so padding rows never softmax over nothing (NaN would leak via V).
    allowed = allowed | (k_pos == q_pos)[None]
    return allowed[:, None]


class MiniMindLM(nn.Module):
    def __init__(self, cfg: LMConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = rms_norm(cfg.hidden_size, cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed_tokens.weight  # tied: one Parameter
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(_init_weights)

    def forward(self, input_ids: Tensor | None = None, inputs_embeds: Tensor | None = None,
                attention_mask: Tensor | None = None, position_ids: Tensor | None = None,
                segment_ids: Tensor | None = None, labels: Tensor | None = None,
                past_key_values: KVCache | None = None, use_cache: bool = False,
                logits_to_keep: int | str | None = None, supervised_index: Tensor | None = None,
                positions_checked: bool = False) -> CausalLMOutput:
        """The optional arguments a training step adds after preparing its batch on the host (train/step.py):

        supervised_index: (N,) long flat indices into (B*T) of the positions whose shifted label is supervised.
        positions_checked: the host checked position_ids < max_position_embeddings; skip that check here.
        """
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, C)
        x = self.dropout(x)
        B, T, _ = x.shape
        past_len = past_key_values[0][0].shape[2] if past_key_values else 0
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # nothing padded: keep SDPA's fast causal path
        if position_ids is None:
            position_ids = default_positions(T, past_len, attention_mask, segment_ids, x.device)
        # Reading the maximum back waits for the device, so a training step checks on the host instead.
        if not positions_checked and int(position_ids.max()) >= self.cfg.max_position_embeddings:
            raise ValueError(f"position {int(position_ids.max())} exceeds max_position_embeddings "
                             f"{self.cfg.max_position_embeddings}")
        cos, sin = self.rope_cos[position_ids], self.rope_sin[position_ids]  # (B, T, D)
        mask = attention_bias(T, past_len, attention_mask, segment_ids, x.device)
        new_cache: KVCache = []
        aux_loss = x.new_zeros((), dtype=torch.float32)
        for i, layer in enumerate(self.layers):
            x, kv, aux = layer(x, cos, sin, mask, past_key_values[i] if past_key_values else None)
            new_cache.append(kv)
            if aux is not None:
                aux_loss = aux_loss + aux
        logits, loss, n_tokens = self._head(x, labels, logits_to_keep, supervised_index)
        if loss is not None and self.training and self.cfg.use_moe:
            loss = loss + aux_loss
        return CausalLMOutput(logits, loss, aux_loss, n_tokens, new_cache if use_cache else None)

    def _head(self, h: Tensor, labels: Tensor | None, logits_to_keep: int | str | None,
              supervised_index: Tensor | None = None) -> tuple[Tensor | None, Tensor | None, Tensor]:
        """Logits as asked, and the loss; with logits_to_keep="none" the head runs only where supervised."""
        if logits_to_keep == "none":
            logits = None
        elif isinstance(logits_to_keep, int) and logits_to_keep > 0:
            logits = self.lm_head(self.norm(h[:, -logits_to_keep:]))  # (B, k, V)
        else:
            logits = self.lm_head(self.norm(h))  # (B, T, V)
        if labels is None:
            return logits, None, torch.zeros((), dtype=torch.long, device=h.device)
        # Position t predicts token t+1: shift the labels left, the last position predicts nothing.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
        supervised = targets != IGNORE_INDEX
        n_tokens = supervised.sum()
        full = logits is not None and logits.shape[1] == h.shape[1]
        if supervised_index is not None:
            # Host-given indices: a gather of known size, where a boolean mask would wait for the device's count.
            picked = (logits.flatten(0, 1) if full else h.flatten(0, 1)).index_select(0, supervised_index)
            picked_targets = targets.flatten().index_select(0, supervised_index)
        else:
            picked, picked_targets = logits[supervised] if full else h[supervised], targets[supervised]
        if not full:
            picked = self.lm_head(self.norm(picked))  # (N, V): the head only where it counts
        total = F.cross_entropy(picked.float(), picked_targets, reduction="sum")
        # With zero supervised tokens this is 0 / 1 = 0, still connected to the graph.
        return logits, total / n_tokens.clamp(min=1), n_tokens


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)
