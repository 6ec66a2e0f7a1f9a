"""MiniMind-V configuration for transformers (trust_remote_code). Self-contained: no minimind_v import.

The language model's settings stay together in `lm` (minimind-v's own LMConfig, as a dict), so an
export and an import are exact copies; the usual transformers names (hidden_size, vocab_size, ...)
are mirrored from it for the library's generic code (caches, generation).
"""

from transformers import PretrainedConfig

LM_DEFAULTS = {
    "vocab_size": 6400, "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
    "num_key_value_heads": 2, "intermediate_size": None, "max_position_embeddings": 32768, "rope_theta": 1e6,
    "rope_scaling": None, "rms_norm_eps": 1e-5, "qk_norm": False, "qk_norm_gain": 1.0, "dropout": 0.0,
    "use_moe": False, "n_routed_experts": 4, "num_experts_per_tok": 2, "n_shared_experts": 1, "norm_topk_prob": True,
    "aux_loss_alpha": 0.1, "seq_aux": True, "numerics": "2025",
}
MIRRORED = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "max_position_embeddings")


class MiniMindVConfig(PretrainedConfig):
    model_type = "minimind_v"

    def __init__(self, lm=None, vision_tower_config=None, vision_hidden_size=768, vision_settings=None,
                 projector="linear", image_token="@", image_token_id=34, image_token_len=196, images_first=False,
                 tie_word_embeddings=True, use_cache=True, **kwargs):
        self.lm = {**LM_DEFAULTS, **(lm or {})}
        self.vision_tower_config = vision_tower_config or {"model_type": "clip_vision_model"}
        self.vision_hidden_size = vision_hidden_size
        # minimind-v's VisionConfig fields (image_size, num_patches, freeze): kept for import-hf
        self.vision_settings = vision_settings or {"image_size": 224, "num_patches": 196, "freeze": True}
        self.projector = projector
        self.image_token = image_token
        self.image_token_id = image_token_id
        self.image_token_len = image_token_len
        self.images_first = images_first  # the processor moves each user turn's images before its text
        self.use_cache = use_cache
        for name in MIRRORED:
            kwargs.pop(name, None)  # derived from `lm` below, never a second source of truth
            setattr(self, name, self.lm[name])
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)

    @property
    def head_dim(self):
        return self.lm["hidden_size"] // self.lm["num_attention_heads"]

    @property
    def ffn_size(self):
        if self.lm["intermediate_size"] is not None:
            return self.lm["intermediate_size"]
        return 64 * -(-int(self.lm["hidden_size"] * 8 / 3) // 64)
