"""The 3v generation's chat template: think blocks masked as the original masks them, its augmentations, prompts.

The original's sample is re-done here from its description (minimind-v dataset/lm_dataset.py, VLMDataset): the
whole text rendered (images as placeholder text), empty think blocks optionally removed, tokenised at once, and
labelled from each `<|im_start|>assistant\\n` header through the next `<|im_end|>\\n`. A tiny tokenizer with a
template of the same structure keeps the suite hermetic; the real 3v tokenizer is checked too when shared/ has it.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minimind_v.data.dataset import DataSettings, VLMDataset
from minimind_v.data.formats import open_dataset
from minimind_v.data.augment import SYSTEM_PROMPTS, ChatAugmentation
from minimind_v.data.template import EMPTY_THINK, IGNORE_INDEX, build_prompt, encode_conversation, has_think_switch
from minimind_v.data.tokenizer import load_tokenizer, save_tokenizer
from minimind_v.errors import UserError

THINK_TEMPLATE = (
    "{%- if messages[0].role == 'system' -%}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- for turn in messages -%}"
    "{%- if turn.role == 'user' or (turn.role == 'system' and not loop.first) -%}"
    "{{- '<|im_start|>' + turn.role + '\\n' + turn.content + '<|im_end|>\\n' -}}"
    "{%- elif turn.role == 'assistant' -%}"
    "{%- set reply = turn.content -%}{%- set thought = '' -%}"
    "{%- if '</think>' in reply -%}"
    "{%- set thought = reply.split('</think>')[0].split('<think>')[-1] -%}"
    "{%- set reply = reply.split('</think>')[-1] -%}"
    "{%- endif -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + thought.strip('\\n') + '\\n</think>\\n\\n' + reply.lstrip('\\n')"
    " + '<|im_end|>\\n' -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{- '<|im_start|>assistant\\n' -}}"
    "{{- '<think>\\n' if (open_thinking is defined and open_thinking) else '<think>\\n\\n</think>\\n\\n' -}}"
    "{%- endif -%}"
)
"""Our own small template with the 3v template's structure: no default system turn, a think block in every
answer (split out of the content at `</think>`), and the open_thinking switch on the generation prompt."""

WORDS = "the a red blue green square circle is on left right of what color shape 你好 图片 think reason".split()


def make_think_tokenizer(vocab_size: int = 400) -> PreTrainedTokenizerFast:
    """Byte-level BPE with THINK_TEMPLATE; `<think>` and `</think>` added but not special, as in the 3v tokenizer
    (so decoding keeps them), after the four special tokens minimind-v's own tokenizer has (image pad = 3)."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 2, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    texts = [" ".join(WORDS[(i * 5 + j * 3) % len(WORDS)] for j in range(9)) for i in range(100)]
    bpe.train_from_iterator(texts, trainer=trainer)
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>",
                                   additional_special_tokens=["<|image_pad|>"], chat_template=THINK_TEMPLATE,
                                   clean_up_tokenization_spaces=False)


@pytest.fixture(scope="session")
def think_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with a think tokenizer instead of its ChatML one (same image pad id, no larger vocabulary)."""
    out = tmp_path_factory.mktemp("think-model") / "model"
    shutil.copytree(tiny_model_dir, out)
    vocab = json.loads((out / "config.json").read_text())["lm"]["vocab_size"]
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (out / name).unlink(missing_ok=True)
    tokenizer = make_think_tokenizer(vocab)
    assert len(tokenizer) <= vocab
    save_tokenizer(tokenizer, out)
    return out


@dataclass
class Placeholder:
    image_token_id: int
    image_token_len: int
    images_first: bool = False


REAL_3V = Path("/work/shared/reference/minimind-3v-tokenizer")


@pytest.fixture(params=["tiny", "real"], scope="module")
def tok_and_image(request):
    if request.param == "tiny":
        return make_think_tokenizer(), Placeholder(3, 5)
    if not REAL_3V.is_dir():
        pytest.skip("the 3v tokenizer is not in shared/reference/")
    return load_tokenizer(REAL_3V), Placeholder(12, 64)


def original_sample(tokenizer, conversation, image, drop_empty_think):
    """The 3v original's ids and labels for a conversation that fits (no truncation, no padding)."""
    pad = tokenizer.convert_ids_to_tokens(image.image_token_id) * image.image_token_len
    turns = [{**t, "content": t["content"].replace("<image>", pad) if t["role"] != "system" else t["content"]}
             for t in conversation]
    text = tokenizer.apply_chat_template(turns, tokenize=False)
    if drop_empty_think:
        text = text.replace(EMPTY_THINK, "")
    ids = tokenizer(text)["input_ids"]
    header = tokenizer(f"{tokenizer.bos_token}assistant\n", add_special_tokens=False)["input_ids"]
    closing = tokenizer(f"{tokenizer.eos_token}\n", add_special_tokens=False)["input_ids"]
    labels, i = [IGNORE_INDEX] * len(ids), 0
    while i < len(ids):
        if ids[i:i + len(header)] != header:
            i += 1
            continue
        start = end = i + len(header)
        while end < len(ids) and ids[end:end + len(closing)] != closing:
            end += 1
        i = min(end + len(closing), len(ids))
        labels[start:i] = ids[start:i]
    return ids, labels


QUESTION = {"role": "user", "content": "<image>\nwhat color is the square?"}
CONVERSATIONS = {
    "one turn": [QUESTION, {"role": "assistant", "content": "red"}],
    "system": [{"role": "system", "content": SYSTEM_PROMPTS[1]}, QUESTION, {"role": "assistant", "content": "red"}],
    "multi-turn": [QUESTION, {"role": "assistant", "content": "red"}, {"role": "user", "content": "<image>\nand this?"},
                   {"role": "assistant", "content": "blue 你好"}, {"role": "user", "content": "which is left?"},
                   {"role": "assistant", "content": "the red square"}],
    "reasoning": [QUESTION, {"role": "assistant", "content": "<think>\nit is red\n</think>\n\nred"},
                  {"role": "user", "content": "sure?"}, {"role": "assistant", "content": "yes"}],
    "text only": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}],
}


@pytest.mark.parametrize("drop", [False, True], ids=["kept", "dropped"])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_ids_and_labels_are_the_originals(tok_and_image, name, drop):
    tokenizer, image = tok_and_image
    conversation = CONVERSATIONS[name]
    n_images = sum(t["content"].count("<image>") for t in conversation)
    ours = encode_conversation(tokenizer, conversation, image, n_images, drop_empty_think=drop)
    assert (ours.input_ids, ours.labels) == original_sample(tokenizer, conversation, image, drop)


def supervised_text(tokenizer, sample) -> list[str]:
    runs, run = [], []
    for token, label in zip(sample.input_ids + [None], sample.labels + [IGNORE_INDEX]):
        if label == IGNORE_INDEX and run:
            runs.append(tokenizer.decode(run))
            run = []
        elif label != IGNORE_INDEX:
            run.append(token)
    return runs


def test_the_think_block_and_the_newline_after_im_end_are_learnt(tok_and_image):
    tokenizer, image = tok_and_image
    chat = CONVERSATIONS["reasoning"]
    kept = encode_conversation(tokenizer, chat, image, 1)
    assert supervised_text(tokenizer, kept) == ["<think>\nit is red\n</think>\n\nred<|im_end|>\n",
                                                "<think>\n\n</think>\n\nyes<|im_end|>\n"]
    dropped = encode_conversation(tokenizer, chat, image, 1, drop_empty_think=True)  # a reasoning block stays
    assert supervised_text(tokenizer, dropped) == ["<think>\nit is red\n</think>\n\nred<|im_end|>\n",
                                                   "yes<|im_end|>\n"]
    assert tokenizer.decode(dropped.input_ids).endswith("<|im_start|>assistant\nyes<|im_end|>\n")


def test_truncation_keeps_whole_turns_with_their_think_blocks(tok_and_image):
    tokenizer, image = tok_and_image
    chat = CONVERSATIONS["reasoning"]
    first = encode_conversation(tokenizer, chat[:2], image, 1)
    cut = encode_conversation(tokenizer, chat, image, 1, max_seq_len=len(first.input_ids) + 3)
    assert (cut.input_ids, cut.labels) == (first.input_ids, first.labels)


def test_prompts_end_with_the_templates_generation_prompt(tok_and_image):
    tokenizer, image = tok_and_image
    history = CONVERSATIONS["multi-turn"][:5]
    for open_thinking, ending in ((False, "<|im_start|>assistant\n<think>\n\n</think>\n\n"),
                                  (True, "<|im_start|>assistant\n<think>\n")):
        prompt = build_prompt(tokenizer, history, image.image_token_id, image.image_token_len,
                              open_thinking=open_thinking)
        pad = tokenizer.convert_ids_to_tokens(image.image_token_id) * image.image_token_len
        text = tokenizer.apply_chat_template([{**t, "content": t["content"].replace("<image>", pad)} for t in history],
                                             tokenize=False, add_generation_prompt=True, open_thinking=open_thinking)
        assert prompt == tokenizer(text)["input_ids"]  # as the original's eval_vlm.py tokenises it
        assert tokenizer.decode(prompt).endswith(ending)


def test_only_a_think_template_has_the_switch(tokenizer_dir):
    chatml = load_tokenizer(tokenizer_dir)
    assert has_think_switch(make_think_tokenizer()) and not has_think_switch(chatml)
    with pytest.raises(ValueError, match="open_thinking"):
        build_prompt(chatml, CONVERSATIONS["text only"][:1], 3, 5, open_thinking=True)
    assert build_prompt(chatml, CONVERSATIONS["text only"][:1], 3, 5, open_thinking=False) == \
        build_prompt(chatml, CONVERSATIONS["text only"][:1], 3, 5)


def test_augmentation_draws_are_seeded_per_record():
    augment = ChatAugmentation(system_prompt_ratio=0.2, drop_empty_think_ratio=0.8)
    chat = CONVERSATIONS["one turn"]
    draws = [augment.draw(chat, seed=7, record=i) for i in range(2000)]
    assert draws == [augment.draw(chat, seed=7, record=i) for i in range(2000)]
    assert draws != [augment.draw(chat, seed=8, record=i) for i in range(2000)]
    systems = [messages[0]["content"] for messages, _ in draws if messages[0]["role"] == "system"]
    assert 0.17 < len(systems) / 2000 < 0.23 and set(systems) == set(SYSTEM_PROMPTS)
    assert all(messages[-2:] == chat for messages, _ in draws)
    assert 0.77 < sum(drop for _, drop in draws) / 2000 < 0.83
    only_drop = ChatAugmentation(drop_empty_think_ratio=0.8)  # one ratio's draws do not move with the other
    assert [d for _, d in draws] == [only_drop.draw(chat, 7, i)[1] for i in range(2000)]
    with_system = CONVERSATIONS["system"]
    assert all(augment.draw(with_system, 7, i)[0] == with_system for i in range(200))
    assert ChatAugmentation().draw(chat, 7, 0) == (chat, False)


def test_augmentation_mistakes_are_one_line_errors(tokenizer_dir):
    with pytest.raises(UserError, match="^--system-prompt-ratio 1.5: must be between 0 and 1$"):
        ChatAugmentation(system_prompt_ratio=1.5).check(make_think_tokenizer())
    with pytest.raises(UserError, match="^--drop-empty-think-ratio 0.8: .*no think block"):
        ChatAugmentation(drop_empty_think_ratio=0.8).check(load_tokenizer(tokenizer_dir))
    ChatAugmentation(system_prompt_ratio=0.2).check(load_tokenizer(tokenizer_dir))  # any template takes a system


def test_the_dataset_applies_the_augmentations_the_same_on_every_pass(tmp_path):
    lines = [{"conversations": [{"role": "user", "content": f"what is {w}?"}, {"role": "assistant", "content": w}]}
             for w in WORDS]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(line) for line in lines) + "\n")
    tokenizer, image = make_think_tokenizer(), Placeholder(3, 5)

    def samples(seed, **settings):
        settings = DataSettings(augment=ChatAugmentation(0.5, 0.5), seed=seed, text_only=True, **settings)
        ds = VLMDataset(open_dataset(tmp_path / "d.jsonl"), tokenizer, image, None, settings)
        return [(ds[i].input_ids.tolist(), ds[i].labels.tolist()) for i in range(len(ds))]

    kept = samples(3)
    assert kept == samples(3, workers=2)  # drawn in other processes: the same draws
    assert kept != samples(4)
    plain = VLMDataset(open_dataset(tmp_path / "d.jsonl"), tokenizer, image, None, DataSettings(text_only=True))
    texts = [tokenizer.decode(ids) for ids, _ in kept]
    assert any(t.startswith("<|im_start|>system\n") for t in texts) and any(EMPTY_THINK not in t for t in texts)
    assert [plain[i].input_ids.tolist() for i in range(len(plain))] == \
        [encode_conversation(tokenizer, line["conversations"], image).input_ids for line in lines]
