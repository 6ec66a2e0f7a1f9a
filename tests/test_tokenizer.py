"""The tokenizer command: special ids, a template equal to the original's, loadable by transformers."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from minimind_v import cli
from minimind_v.data.chatml import CHAT_TEMPLATE, render_chatml
from minimind_v.data.template import render
from minimind_v.data.tokenizer import corpus_texts, load_tokenizer
from minimind_v.errors import UserError


CONVERSATIONS = [
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<image>\nwhat?"},
     {"role": "assistant", "content": "a red square"}, {"role": "user", "content": "and?"},
     {"role": "assistant", "content": ""}],
    [{"role": "user", "content": "多轮\n对话"}],
]


def test_special_tokens_and_loading(tokenizer_dir):
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"])
    assert ids == [0, 1, 2, 3]
    assert (tok.pad_token_id, tok.eos_token_id) == (0, 2)
    assert "chat_template" in json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    text = "the red square 你好"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_template_renders_like_the_original(tokenizer_dir, original_tokenizer_dir, messages, generation_prompt):
    ours, original = load_tokenizer(tokenizer_dir), load_tokenizer(original_tokenizer_dir)
    kwargs = {"tokenize": False, "add_generation_prompt": generation_prompt}
    assert ours.apply_chat_template(messages, **kwargs) == original.apply_chat_template(messages, **kwargs)


@pytest.mark.parametrize("messages", CONVERSATIONS + [
    [{"role": "user", "content": "a"}, {"role": "system", "content": "late"}, {"role": "assistant", "content": "b"}],
    [{"role": "system", "content": ""}]])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_python_rendering_equals_the_template(tokenizer_dir, messages, generation_prompt):
    # Training renders our own template in Python (data/template.render_chatml); jinja must agree exactly.
    tok = load_tokenizer(tokenizer_dir)
    assert tok.chat_template == CHAT_TEMPLATE
    jinja = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert render_chatml(messages, generation_prompt) == jinja == render(tok, messages, generation_prompt)


def test_command_trains_from_jsonl_and_parquet(tmp_path):
    jsonl = tmp_path / "a.jsonl"
    jsonl.write_text(json.dumps({"conversations": [{"role": "user", "content": "<image>\nzebra zebra"},
                                                   {"role": "assistant", "content": "zebra"}]}) + "\n{broken\n")
    parquet = tmp_path / "b.parquet"
    convs = json.dumps([{"role": "user", "content": "quokka"}, {"role": "assistant", "content": "quokka"}])
    pq.write_table(pa.table({"conversations": [convs] * 3}), parquet)
    texts = list(corpus_texts([str(jsonl), str(parquet)]))
    # Turns as the template lays them out between special tokens, the default system turn included.
    assert texts[:3] == ["system\nYou are a helpful assistant", "user\n\nzebra zebra", "assistant\nzebra"]
    assert "user\nquokka" in texts
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "--corpus", str(jsonl), str(parquet), "--vocab-size", "300", "--out", str(out)]) == 0
    tok = load_tokenizer(out)
    assert len(tok) <= 300 and tok.convert_tokens_to_ids("<|image_pad|>") == 3


def test_template_words_get_their_own_tokens(tmp_path):
    # Role names and the default system prompt are in every sample: a tokenizer trained on the data alone
    # spelt "assistant" in 8 tokens and the system prompt in 22.
    data = tmp_path / "a.jsonl"
    rows = [{"conversations": [{"role": "user", "content": f"what is {i}?"}, {"role": "assistant", "content": str(i)}]}
            for i in range(200)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "tok"
    assert cli.main(["tokenizer", "--corpus", str(data), "--vocab-size", "300", "--out", str(out)]) == 0
    tok = load_tokenizer(out)
    for text, most in (("assistant", 1), ("user", 1), ("system", 1), ("You are a helpful assistant", 5)):
        assert len(tok(text, add_special_tokens=False).input_ids) <= most, text


def test_words_are_the_same_tokens_in_every_sentence(tmp_path):
    # Chinese has no spaces: trained on these sentences alone, BPE merges "色" into the shape ("色圆形") in the
    # descriptions and leaves "圆形" apart in the shape answers, so one shape has two spellings.
    from minimind_v.data.synth.language import lexicon
    from minimind_v.data.tokenizer import save_tokenizer, train_tokenizer

    texts = ["左上：大红色圆形；中间：小蓝色圆形。", "左上：圆形", "红色圆形在哪里？"]

    def one_spelling(directory):
        tok = load_tokenizer(directory)
        ids = [tok(t, add_special_tokens=False).input_ids for t in texts]
        assert [tok.decode(i) for i in ids] == texts
        shape = tok("圆形", add_special_tokens=False).input_ids
        return len(shape) == 1 and [i.count(shape[0]) for i in ids] == [2, 1, 1]

    for words, name in (([], "plain"), (lexicon("zh"), "whole")):
        save_tokenizer(train_tokenizer(iter(texts * 50), 300, words), tmp_path / name)
        assert one_spelling(tmp_path / name) == (name == "whole"), name
    corpus = tmp_path / "world.txt"
    corpus.write_text("\n".join(texts * 50) + "\n", encoding="utf-8")
    for flag in ([], ["--world-words"]):
        out = tmp_path / f"cli{len(flag)}"
        assert cli.main(["tokenizer", "--corpus", str(corpus), "--vocab-size", "300", *flag, "--out", str(out)]) == 0
        assert one_spelling(out) == bool(flag), flag


def test_errors_name_the_path(tmp_path):
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path)
    with pytest.raises(UserError, match="nothing.txt"):
        list(corpus_texts([str(tmp_path / "nothing.txt")]))
    assert cli.main(["tokenizer", "--corpus", str(tmp_path / "x.txt"), "--out", str(tmp_path / "o")]) == 2


def test_saved_config_holds_no_loading_options(tokenizer_dir, tmp_path):
    """transformers 5 writes the from_pretrained flags it was given (local_files_only, is_local) into the config."""
    import json

    from minimind_v.data.tokenizer import load_tokenizer, save_tokenizer

    save_tokenizer(load_tokenizer(tokenizer_dir), tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert "local_files_only" not in config and "is_local" not in config and config["chat_template"]
