"""Loss masks from the chat template, image placeholders at the token level, truncation, prompts."""

from dataclasses import dataclass

import pytest

from minimind_v.data.formats import BadSample
from minimind_v.data.template import IGNORE_INDEX, build_prompt, encode_conversation, encode_text, images_first
from minimind_v.data.tokenizer import load_tokenizer



@dataclass
class Placeholder:
    image_token_id: int
    image_token_len: int
    images_first: bool = False


CHAT = [
    {"role": "system", "content": "Answer in one word."},
    {"role": "user", "content": "<image>\nwhat color is the square?"},
    {"role": "assistant", "content": "red"},
    {"role": "user", "content": "and the circle, left of it?"},
    {"role": "assistant", "content": "blue 你好"},
]


@pytest.fixture(params=["trained", "original"])
def tok_and_image(request, tokenizer_dir):
    path = tokenizer_dir if request.param == "trained" else request.getfixturevalue("original_tokenizer_dir")
    return load_tokenizer(path), \
        Placeholder(3, 5) if request.param == "trained" else Placeholder(34, 7)


def _supervised_runs(sample):
    """Maximal runs of supervised token ids."""
    runs, current = [], []
    for token, label in zip(sample.input_ids, sample.labels):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == token
            current.append(token)
    return runs + ([current] if current else [])


def test_mask_is_exactly_each_answer_and_its_end(tok_and_image):
    tok, image = tok_and_image
    sample = encode_conversation(tok, CHAT, image, n_images=1)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    expected = [tok(m["content"], add_special_tokens=False)["input_ids"] + [end]
                for m in CHAT if m["role"] == "assistant"]
    assert _supervised_runs(sample) == expected
    # the unsupervised rest is the template around them: role headers, system, user, trailing newlines
    header = tok("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
    for run in expected:
        start = next(i for i in range(len(sample.input_ids)) if sample.input_ids[i:i + len(run)] == run)
        assert sample.input_ids[start - len(header):start] == header
        assert sample.labels[start + len(run)] == IGNORE_INDEX  # the "\n" after <|im_end|>
    assert sample.labels[-1] == IGNORE_INDEX and tok.decode(sample.input_ids[-2:]) == "<|im_end|>\n"


def test_image_marker_becomes_one_placeholder_run(tok_and_image):
    tok, image = tok_and_image
    sample = encode_conversation(tok, CHAT, image, n_images=1)
    ids = sample.input_ids
    start = ids.index(image.image_token_id)
    assert ids[start:start + image.image_token_len] == [image.image_token_id] * image.image_token_len
    assert image.image_token_id not in ids[start + image.image_token_len:]
    assert all(label == IGNORE_INDEX for label in sample.labels[start:start + image.image_token_len])
    rendered = tok.apply_chat_template(CHAT, tokenize=False)
    assert tok.decode(ids).replace(tok.decode([image.image_token_id]) * image.image_token_len, "<image>") == rendered


def test_images_without_markers_go_before_the_first_question(tok_and_image):
    tok, image = tok_and_image
    plain = [{"role": "user", "content": "two pictures?"}, {"role": "assistant", "content": "yes"}]
    marked = [{"role": "user", "content": "<image>\n<image>\ntwo pictures?"}, {"role": "assistant", "content": "yes"}]
    sample = encode_conversation(tok, plain, image, n_images=2)
    assert sample.input_ids == encode_conversation(tok, marked, image, n_images=2).input_ids
    assert sample.input_ids.count(image.image_token_id) == 2 * image.image_token_len and sample.n_images == 2


@pytest.mark.parametrize("messages, n_images, reason", [
    (CHAT, 2, "marker_mismatch"),
    (CHAT, 0, "marker_mismatch"),
    (CHAT[1:2], 1, "bad_roles"),                                       # no answer
    ([CHAT[2], CHAT[1]], 1, "bad_roles"),                              # assistant first
    (CHAT[:2] + [CHAT[0], CHAT[2]], 1, "bad_roles"),                   # system in the middle
    ([CHAT[1], CHAT[1], CHAT[2]], 2, "bad_roles"),                     # two users in a row
])
def test_bad_conversations(tokenizer_dir, messages, n_images, reason):
    with pytest.raises(BadSample) as err:
        encode_conversation(load_tokenizer(tokenizer_dir), messages, Placeholder(3, 5), n_images=n_images)
    assert err.value.reason == reason


def test_truncation_drops_whole_trailing_turns(tok_and_image):
    tok, image = tok_and_image
    full = encode_conversation(tok, CHAT, image, n_images=1)
    first = encode_conversation(tok, CHAT[:3], image, n_images=1)
    for limit in (len(first.input_ids), len(full.input_ids) - 1):
        cut = encode_conversation(tok, CHAT, image, n_images=1, max_seq_len=limit)
        assert (cut.input_ids, cut.labels, cut.n_images) == (first.input_ids, first.labels, 1)
    with pytest.raises(BadSample, match="too_long"):
        encode_conversation(tok, CHAT, image, n_images=1, max_seq_len=len(first.input_ids) - 1)


def test_truncation_drops_the_images_of_dropped_turns(tokenizer_dir):
    tok, image = load_tokenizer(tokenizer_dir), Placeholder(3, 5)
    chat = CHAT[:3] + [{"role": "user", "content": "<image>\nthis one?"}, {"role": "assistant", "content": "green"}]
    full = encode_conversation(tok, chat, image, n_images=2)
    cut = encode_conversation(tok, chat, image, n_images=2, max_seq_len=len(full.input_ids) - 1)
    assert full.n_images == 2 and cut.n_images == 1
    assert cut.input_ids.count(3) == 5


def test_prompt_is_the_training_prefix(tok_and_image):
    tok, image = tok_and_image
    sample = encode_conversation(tok, CHAT, image, n_images=1)
    prompt = build_prompt(tok, CHAT[:4], image.image_token_id, image.image_token_len)
    assert sample.input_ids[:len(prompt)] == prompt
    assert sample.labels[len(prompt) - 1] == IGNORE_INDEX and sample.labels[len(prompt)] != IGNORE_INDEX
    assert tok.decode(prompt).endswith("<|im_start|>assistant\n")
    with pytest.raises(BadSample, match="bad_roles"):
        build_prompt(tok, CHAT, image.image_token_id, image.image_token_len)


def test_plain_text_is_all_supervised(tokenizer_dir):
    tok = load_tokenizer(tokenizer_dir)
    sample = encode_text(tok, "the red square")
    assert sample.labels == sample.input_ids and sample.input_ids[-1] == tok.eos_token_id
    with pytest.raises(BadSample, match="no_supervised_tokens"):
        encode_text(tok, "")


def test_images_first_reads_a_text_first_turn_as_the_image_first_one(tok_and_image):
    tokenizer, image = tok_and_image
    first = Placeholder(image.image_token_id, image.image_token_len, images_first=True)
    text_first = [CHAT[0], {"role": "user", "content": "what color is the square?\n<image>"}, *CHAT[2:]]
    assert images_first(CHAT) == CHAT  # already image-first: unchanged
    assert images_first(text_first) == CHAT
    two = [{"role": "user", "content": "compare\n<image>\n<image>"}, {"role": "assistant", "content": "same"}]
    assert images_first(two)[0]["content"] == "<image>\n<image>\ncompare"
    # A labelled image line moves whole: the label still names the image after it.
    labelled = [{"role": "user", "content": "compare\nfirst: <image>\nsecond: <image>"}, two[1]]
    assert images_first(labelled)[0]["content"] == "first: <image>\nsecond: <image>\ncompare"
    zh = [{"role": "user", "content": "比较\n第一张：<image>\n第二张：<image>"}, two[1]]
    assert images_first(zh)[0]["content"] == "第一张：<image>\n第二张：<image>\n比较"
    # A question that ends in a marker is no label: the marker alone moves.
    asked = [{"role": "user", "content": "what color is the square in this picture? <image>"}, two[1]]
    assert images_first(asked)[0]["content"] == "<image>\nwhat color is the square in this picture? "
    trained = encode_conversation(tokenizer, CHAT, image, n_images=1)
    for conversation in (CHAT, text_first):
        moved = encode_conversation(tokenizer, conversation, first, n_images=1)
        assert (moved.input_ids, moved.labels) == (trained.input_ids, trained.labels)
    as_given = encode_conversation(tokenizer, text_first, image, n_images=1)
    assert as_given.input_ids != trained.input_ids  # off (the original's models): the order is kept
    prompt = [CHAT[0], {"role": "user", "content": "what color is the square?\n<image>"}]
    assert build_prompt(tokenizer, prompt, first.image_token_id, first.image_token_len, images_first=True) == \
        build_prompt(tokenizer, CHAT[:2], first.image_token_id, first.image_token_len)
