"""`minimind-v tokenizer`: train a byte-level BPE tokenizer; `load_tokenizer` for any Hugging Face tokenizer dir.

The trained tokenizer has the original MiniMind's special tokens (<|endoftext|>=0 pad/unk,
<|im_start|>=1, <|im_end|>=2) plus <|image_pad|>=3, the image placeholder, and a ChatML chat
template whose output equals the original's for system/user/assistant conversations, including the
default "You are a helpful assistant" system turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minimind_v.data.formats import BadSample, open_dataset
from minimind_v.constants import IMAGE_MARKER
from minimind_v.data.chatml import CHAT_TEMPLATE, DEFAULT_SYSTEM
from minimind_v.errors import UserError

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]


@dataclass
class TokenizerOptions:
    corpus: list[str] = field(metadata={"nargs": "+"})
    """Text files (.txt, one document per line), or data files (.jsonl/.json/.parquet: their conversation texts)."""
    out: str = "tokenizer"
    """Directory to write tokenizer.json and tokenizer_config.json to."""
    vocab_size: int = 6400
    """Tokens in the vocabulary, the 4 special tokens and the 256 byte tokens included."""
    world_words: bool = False
    """Keep each Chinese word of the synthetic world's answers whole, as the quickstart's tokenizer does (see
    train_tokenizer's `words`)."""


def corpus_texts(paths: list[str]) -> Iterator[str]:
    """Every text in the corpus files; <image> markers are removed (they never go through BPE).

    A conversation's turns come as the chat template lays them out between its special tokens:
    "user\\n<content>", "assistant\\n<content>", and the default system turn when it has none. The
    role names and the system prompt then get tokens of their own instead of costing a token per
    letter or two in every training sample (measured on the synthetic world with a 600-token
    vocabulary: 22 tokens for the system prompt and 8 for "assistant" when only contents were seen).
    """
    for name in paths:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"--corpus {path}: no such file")
        if path.suffix.lower() not in (".jsonl", ".json", ".parquet"):
            with open(path, encoding="utf-8", errors="replace") as f:
                yield from (line.rstrip("\n") for line in f)
            continue
        reader = open_dataset(path, path.parent)
        for i in range(len(reader)):
            try:
                raw = reader[i]
            except BadSample:
                continue  # a tokenizer corpus tolerates a broken line; training will count it
            if raw.text is not None:
                yield raw.text.replace(IMAGE_MARKER, "")
                continue
            turns = raw.conversations
            if not turns or turns[0]["role"] != "system":
                yield f"system\n{DEFAULT_SYSTEM}"
            yield from (f"{turn['role']}\n{turn['content'].replace(IMAGE_MARKER, '')}" for turn in turns)


def train_tokenizer(texts: Iterator[str], vocab_size: int, words: Sequence[str] = ()) -> Any:
    """Byte-level BPE over `texts` -> a transformers PreTrainedTokenizerFast with the ChatML template.

    `words` (Chinese, for instance) are split off their neighbours before BPE, so no merge crosses them. Chinese
    has no spaces: without it BPE merges across words ("色圆形", "色圆形吗"), and one word becomes different tokens
    in different sentences, which a small model must then learn apart. The quickstart passes its world's words.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = len(SPECIAL_TOKENS) + 256
    if vocab_size < minimum:
        raise UserError(f"--vocab-size {vocab_size}: must be at least {minimum} (special tokens + 256 bytes)")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if words:
        # Longest first: the regex takes the first alternative that matches.
        lexicon = "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(lexicon), behavior="isolated"),
                                                     bpe.pre_tokenizer])
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>",
        unk_token="<|endoftext|>", additional_special_tokens=["<|image_pad|>"], chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False, model_max_length=32768)


def save_tokenizer(tokenizer: Any, out: str | Path) -> None:
    """tokenizer.json + tokenizer_config.json, the chat template inside the config (as the original keeps it)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(out)
    config_path = out / "tokenizer_config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    for loading_only in ("is_local", "local_files_only"):  # how it was loaded here, not what it is
        config.pop(loading_only, None)
    config["chat_template"] = tokenizer.chat_template
    config_path.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
    (out / "chat_template.jinja").unlink(missing_ok=True)  # one copy of the template, not two


def load_tokenizer(path: str | Path) -> Any:
    """Any Hugging Face tokenizer directory -> a fast tokenizer; UserError naming the directory when absent."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        raise UserError(f"--tokenizer {path}: no tokenizer.json or tokenizer_config.json there")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UserError(f"--tokenizer {path}: cannot load ({str(err).splitlines()[0]})") from None
    if tokenizer.eos_token is None or not tokenizer.chat_template:
        raise UserError(f"--tokenizer {path}: needs an eos_token and a chat_template in tokenizer_config.json")
    return tokenizer


def main(opts: TokenizerOptions) -> int:
    from minimind_v.data.synth.language import lexicon

    tokenizer = train_tokenizer(corpus_texts(opts.corpus), opts.vocab_size, lexicon("zh") if opts.world_words else ())
    save_tokenizer(tokenizer, opts.out)
    print(f"wrote {opts.out}: {len(tokenizer)} tokens")
    return 0
