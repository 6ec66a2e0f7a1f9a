"""MiniMind-V for transformers (trust_remote_code). Self-contained: no minimind_v import.

The same numerics as minimind-v's own model (RMSNorm with float32 statistics, rotate-half RoPE
with optional YaRN, grouped-query attention on SDPA with optional q/k norms, SwiGLU or MoE, tied
embeddings; the 2025 or the 2026 original's order of operations, as `lm["numerics"]` says) and the same
weight names, so an exported model.safetensors is minimind-v's state dict as it is. Images: the
vision tower's patch features, projected, replace each run of `image_token_len` placeholder tokens
(`image_token_id`), the k-th run (row by row) taking the k-th image. Pass `pixel_values` to
`generate` with the prompt; later decoding steps carry no placeholders.

The export's MiniMindVProcessor (processing_minimind_v.py, `AutoProcessor`) builds the inputs: the chat
template, each `<image>` as `[config.image_token_id] * config.image_token_len` at the token level (a
placeholder such as "@" must not go through BPE, which would merge repeated copies), pixel_values from
the directory's image processor, and left-padded batches with an attention_mask.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, CLIPVisionModel, GenerationMixin, PreTrainedModel, SiglipVisionModel
from transformers.cache_utils import DynamicCache
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_minimind_v import MiniMindVConfig

try:
    from transformers import Siglip2VisionModel
except ImportError:  # older transformers: CLIP and SigLIP towers still work
    Siglip2VisionModel = None

# transformers 5.24 renamed the decoding cache from `past_key_values` to `cache`, in what `generate` passes
# to `forward` and in what it reads back from the output. `forward` takes either name and answers under the
# name of the installed version, so neither side of the rename starts a fresh cache every step.
CACHE_FIELD = "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"

TOWERS = {"clip": CLIPVisionModel, "siglip": SiglipVisionModel, "siglip2": Siglip2VisionModel}


class RMSNorm(nn.Module):
    def __init__(self, dim, lm):
        super().__init__()
        self.eps = lm["rms_norm_eps"]
        self.weight_in_float32 = lm["numerics"] == "2026"  # 2025 casts back before the weight, 2026 after
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight_in_float32:
            return (self.weight * normed).type_as(x)
        return self.weight * normed.type_as(x)


def rope_frequencies(lm, head_dim):
    """Half-dimension inverse frequencies, YaRN-scaled when configured (minimind-v's rule)."""
    d = head_dim
    freqs = 1.0 / (lm["rope_theta"] ** (torch.arange(0, d, 2)[: d // 2].float() / d))
    scaling = lm["rope_scaling"]
    if scaling is None:
        return freqs
    if lm["numerics"] == "2026":
        return freqs * yarn_ramp(d, lm["rope_theta"], scaling)
    orig_max = scaling.get("original_max_position_embeddings", 2048)
    factor = scaling.get("factor", 4)
    beta_fast, beta_slow = scaling.get("beta_fast", 4.0), scaling.get("beta_slow", 1.0)
    if lm["max_position_embeddings"] / orig_max <= 1.0:
        return freqs
    half = d // 2
    corr_dim = next((i for i in range(half) if 2 * math.pi / freqs[i] > orig_max), half)
    power = torch.arange(half).float() / max(half - 1, 1)
    beta = beta_slow + (beta_fast - beta_slow) * power
    scale = torch.where(torch.arange(half) < corr_dim, (beta * factor - beta + 1) / (beta * factor), 1.0 / factor)
    return freqs * scale


def yarn_ramp(d, theta, scaling):
    """The 2026 original's YaRN frequency scale: a linear ramp from 1 (fast dimensions) to 1/factor (slow ones)."""
    orig_max = scaling.get("original_max_position_embeddings", 2048)
    factor = scaling.get("factor", 16)
    beta_fast, beta_slow = scaling.get("beta_fast", 32.0), scaling.get("beta_slow", 1.0)

    def dim_turning(turns):
        return d * math.log(orig_max / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = max(math.floor(dim_turning(beta_fast)), 0), min(math.ceil(dim_turning(beta_slow)), d // 2 - 1)
    ramp = ((torch.arange(d // 2).float() - low) / max(high - low, 0.001)).clamp(0, 1)
    return 1 - ramp + ramp / factor


def rope_cos_sin(freqs, position_ids, lm):
    """cos, sin (B, T, head_dim) at each position, rotate-half layout; computed per call (no buffers to load)."""
    angles = position_ids.float()[..., None] * freqs.to(position_ids.device)  # (B, T, d/2)
    cos, sin = torch.cat([angles.cos(), angles.cos()], -1), torch.cat([angles.sin(), angles.sin()], -1)
    if lm["numerics"] == "2026" and lm["rope_scaling"] is not None:
        scale = lm["rope_scaling"].get("attention_factor", 1.0)
        return cos * scale, sin * scale
    return cos, sin


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x, cos, sin):
    xf = x.float()
    return (xf * cos.unsqueeze(1).float() + rotate_half(xf) * sin.unsqueeze(1).float()).type_as(x)


def repeat_kv(x, n_rep):
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        lm = config.lm
        self.layer_idx = layer_idx
        self.n_heads, self.n_kv_heads, self.head_dim = lm["num_attention_heads"], lm["num_key_value_heads"], config.head_dim
        self.q_proj = nn.Linear(lm["hidden_size"], self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(lm["hidden_size"], self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(lm["hidden_size"], self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, lm["hidden_size"], bias=False)
        self.q_norm = RMSNorm(self.head_dim, lm) if lm["qk_norm"] else None
        self.k_norm = RMSNorm(self.head_dim, lm) if lm["qk_norm"] else None

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        had_past = cache is not None and cache.get_seq_length(self.layer_idx) > 0
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        n_rep = self.n_heads // self.n_kv_heads
        y = F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), attn_mask=mask,
                                           is_causal=mask is None and not had_past and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class FeedForward(nn.Module):
    def __init__(self, hidden, inner):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inner, bias=False)
        self.up_proj = nn.Linear(hidden, inner, bias=False)
        self.down_proj = nn.Linear(inner, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoEFeedForward(nn.Module):
    """Softmax router, top-k routed experts (weights renormalised) plus shared experts; inference only."""

    def __init__(self, config):
        super().__init__()
        lm = config.lm
        self.top_k, self.n_experts = lm["num_experts_per_tok"], lm["n_routed_experts"]
        # 2025 leaves a top-1 weight as its score, 2026 renormalises it to 1
        self.renormalise = lm["norm_topk_prob"] and (self.top_k > 1 or lm["numerics"] == "2026")
        self.router = nn.Linear(lm["hidden_size"], self.n_experts, bias=False)
        self.experts = nn.ModuleList(FeedForward(lm["hidden_size"], config.ffn_size) for _ in range(self.n_experts))
        self.shared_experts = nn.ModuleList(
            FeedForward(lm["hidden_size"], config.ffn_size) for _ in range(lm["n_shared_experts"]))

    def forward(self, x):
        B, T, C = x.shape
        scores = self.router(x).softmax(dim=-1)
        weights, experts = torch.topk(scores.view(-1, self.n_experts), k=self.top_k, dim=-1, sorted=False)
        if self.renormalise:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        flat = x.reshape(-1, C)
        y = torch.zeros_like(flat)
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(experts == e)
            y = y.index_add(0, token, (expert(flat[token]) * weights[token, slot, None]).to(y.dtype))
        y = y.view(B, T, C)
        for shared in self.shared_experts:
            y = y + shared(x)
        return y


class Block(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        lm = config.lm
        self.attn_norm = RMSNorm(lm["hidden_size"], lm)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(lm["hidden_size"], lm)
        self.mlp = MoEFeedForward(config) if lm["use_moe"] else FeedForward(lm["hidden_size"], config.ffn_size)

    def forward(self, x, cos, sin, mask, cache):
        h = x + self.attn(self.attn_norm(x), cos, sin, mask, cache)
        return h + self.mlp(self.mlp_norm(h))


def attention_mask_4d(T, past_len, attention_mask, device):
    """Boolean (B, 1, T, past+T) of allowed keys, or None when plain causal attention suffices."""
    if attention_mask is None and (past_len == 0 or T == 1):
        return None
    S = past_len + T
    q_pos = torch.arange(past_len, S, device=device)[:, None]
    k_pos = torch.arange(S, device=device)[None, :]
    allowed = (k_pos <= q_pos)[None]
    if attention_mask is not None:
        allowed = allowed & attention_mask.bool()[:, None, :]
    allowed = allowed | (k_pos == q_pos)[None]  # a padding row still sees itself: no all-masked softmax
    return allowed[:, None]


class LanguageModel(nn.Module):
    def __init__(self, config):
        super().__init__()
        lm = config.lm
        self.embed_tokens = nn.Embedding(lm["vocab_size"], lm["hidden_size"])
        self.layers = nn.ModuleList(Block(config, i) for i in range(lm["num_hidden_layers"]))
        self.norm = RMSNorm(lm["hidden_size"], lm)
        self.lm_head = nn.Linear(lm["hidden_size"], lm["vocab_size"], bias=False)
        self.lm_settings, self.head_dim = lm, config.head_dim

    def forward(self, x, attention_mask, position_ids, cache):
        B, T, _ = x.shape
        past_len = cache.get_seq_length() if cache is not None else 0
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None
        if position_ids is None:
            if attention_mask is not None:  # left padding: count only real tokens
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -T:]
            else:
                position_ids = torch.arange(past_len, past_len + T, device=x.device)[None]
        # Frequencies per call, not a buffer: transformers builds models on the meta device, and a few
        # hundred floats cost nothing next to the layers.
        cos, sin = rope_cos_sin(rope_frequencies(self.lm_settings, self.head_dim), position_ids, self.lm_settings)
        mask = attention_mask_4d(T, past_len, attention_mask, x.device)
        for layer in self.layers:
            x = layer(x, cos, sin, mask, cache)
        return x


class Projector(nn.Module):
    def __init__(self, kind, vision_dim, hidden):
        super().__init__()
        if kind == "linear":
            self.net = nn.Sequential(nn.Linear(vision_dim, hidden))
        else:
            self.net = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, hidden), nn.GELU(),
                                     nn.Linear(hidden, hidden))

    def forward(self, features):
        return self.net(features)


class VisionTower(nn.Module):
    """CLIP: last_hidden_state without CLS; SigLIP: all of it; SigLIP2: patches flattened as its processor does."""

    def __init__(self, tower_config):
        super().__init__()
        settings = dict(tower_config)
        model_type = settings.pop("model_type")
        self.family = model_type.removesuffix("_vision_model")
        self.model = TOWERS[self.family](AutoConfig.for_model(model_type, **settings))

    def forward(self, pixel_values):
        pixel_values = pixel_values.to(self.model.dtype)
        if self.family == "siglip2":
            N, C, H, W = pixel_values.shape
            p = self.model.config.patch_size
            h, w = H // p, W // p
            patches = pixel_values.reshape(N, C, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(N, h * w, p * p * C)
            mask = torch.ones(N, h * w, dtype=torch.long, device=pixel_values.device)
            shapes = torch.tensor([[h, w]] * N, dtype=torch.long, device=pixel_values.device)
            return self.model(pixel_values=patches, pixel_attention_mask=mask, spatial_shapes=shapes).last_hidden_state
        hidden = self.model(pixel_values=pixel_values).last_hidden_state
        return hidden[:, 1:] if self.family == "clip" else hidden


class MiniMindVForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = MiniMindVConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _tied_weights_keys = {"lm.lm_head.weight": "lm.embed_tokens.weight"}
    _no_split_modules = ["Block"]
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.vision = VisionTower(config.vision_tower_config)
        self.projector = Projector(config.projector, config.vision_hidden_size, config.lm["hidden_size"])
        self.lm = LanguageModel(config)
        self.post_init()

    def get_input_embeddings(self):
        return self.lm.embed_tokens

    def set_input_embeddings(self, value):
        self.lm.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm.lm_head

    def encode_images(self, pixel_values):
        """(N, 3, H, W) or (B, N, 3, H, W) -> (N_total, n_patches, vision_dim)."""
        return self.vision(pixel_values.flatten(0, pixel_values.dim() - 4))

    def insert_images(self, input_ids, embeds, features):
        is_image = input_ids == self.config.image_token_id
        expected = features.shape[0] * self.config.image_token_len
        if int(is_image.sum()) != expected:
            raise ValueError(f"{int(is_image.sum())} image placeholder tokens but {features.shape[0]} images "
                             f"need {expected}")
        projected = self.projector(features.to(self.projector.net[-1].weight.dtype))
        embeds = embeds.clone()
        embeds[is_image] = projected.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None, cache=None,
                inputs_embeds=None, labels=None, use_cache=None, logits_to_keep=0, past_key_values=None, **kwargs):
        if cache is None:  # transformers < 5.24 (and callers written for it) pass past_key_values
            cache = past_key_values
        if inputs_embeds is None:
            inputs_embeds = self.lm.embed_tokens(input_ids)
            if pixel_values is not None and bool((input_ids == self.config.image_token_id).any()):
                inputs_embeds = self.insert_images(input_ids, inputs_embeds, self.encode_images(pixel_values))
        use_cache = self.config.use_cache if use_cache is None else use_cache
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden = self.lm(inputs_embeds, attention_mask, position_ids, cache if use_cache else None)
        if isinstance(logits_to_keep, int) and logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm.lm_head(self.lm.norm(hidden))
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache if use_cache else None})
