"""The 3v recipe's random edits of a training conversation: a system turn, and the empty think blocks dropped."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from minimind_v.data.template import has_think_switch
from minimind_v.errors import UserError
from minimind_v.options import flag_name


SYSTEM_PROMPTS = (
    "你是一个知识丰富的AI，尽力为用户提供准确的信息。",
    "你是minimind，一个小巧但有用的语言模型。",
    "你是一个专业的AI助手，请提供有价值的回答。",
    "你是minimind，请尽力帮助用户解决问题。",
    "你是一个可靠的AI，请给出准确的回答。",
    "You are a helpful AI assistant.",
    "You are minimind, a lightweight intelligent assistant.",
    "You are a friendly chatbot. Please answer the user's questions carefully.",
    "You are a knowledgeable AI. Try your best to provide accurate information.",
    "You are minimind, a small but useful language model.",
)
"""The system turns the 3v recipe picks from (the original's list, in its order)."""


@dataclass
class ChatAugmentation:
    """The 3v recipe's random edits of a training conversation, both off by default (each sample as written).

    The original (minimind-v, dataset/lm_dataset.py; `VLMDataset.__getitem__`, pretrain and SFT alike) makes two:
    `pre_processing_chat` puts a system turn drawn uniformly from SYSTEM_PROMPTS before a conversation that has
    none, with probability 0.2 (tool-use conversations are left alone; our formats carry no tools), and
    `post_processing_chat` deletes every empty think block from the rendered text with probability 0.8 (it keeps
    them with its `empty_think_ratio` 0.2), so most answers are learnt without one. `open_thinking` is never
    passed in training: it only changes the generation prompt. The original draws from the process-wide
    `random` afresh each epoch; here each record's draws come from (seed, its line) once, so the up-front
    pass's lengths, which grouped and packed batches rely on, stay exact and a rerun sees the same samples.
    """

    system_prompt_ratio: float = 0.0
    """Share of conversations without a system turn that get one of the 3v recipe's system prompts (its value: 0.2)."""
    drop_empty_think_ratio: float = 0.0
    """Share of conversations whose empty think blocks are removed before training (the 3v recipe's value: 0.8)."""

    def check(self, tokenizer: Any) -> None:
        """One line naming the flag for a ratio out of [0, 1], or an empty-think drop the template cannot do."""
        for name in ("system_prompt_ratio", "drop_empty_think_ratio"):
            if not 0 <= getattr(self, name) <= 1:
                raise UserError(f"{flag_name(name)} {getattr(self, name)}: must be between 0 and 1")
        if self.drop_empty_think_ratio and not has_think_switch(tokenizer):
            raise UserError(f"{flag_name('drop_empty_think_ratio')} {self.drop_empty_think_ratio}: the tokenizer's "
                            "chat template writes no think block (a 2025-generation tokenizer); leave it at 0")

    def draw(self, messages: list[dict[str, str]], seed: int, record: str | int) -> tuple[list[dict[str, str]], bool]:
        """A record's conversation with its drawn system turn, and whether its empty think blocks go; `record`
        names the record (its line), so the draws are the same on every pass."""
        if not (self.system_prompt_ratio or self.drop_empty_think_ratio):
            return messages, False
        rng = random.Random(f"minimind-v augmentation {seed} {record}")  # a str seed hashes the same in every process
        # All three draws always, so that changing one ratio never changes what the other one picks.
        add_system, system, drop = rng.random(), rng.choice(SYSTEM_PROMPTS), rng.random()
        if add_system < self.system_prompt_ratio and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": system}, *messages]
        return messages, drop < self.drop_empty_think_ratio
