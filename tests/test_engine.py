"""The generation engine: cache, batching, sampling, stopping and streaming invariants at tiny size."""

from __future__ import annotations

import asyncio
import dataclasses
import threading

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from minimind_v import presets
from minimind_v.data.images import ImagePreprocessor
from minimind_v.errors import UserError
from minimind_v.infer.engine import Engine, SamplingParams, _Sampler
from minimind_v.infer.streaming import Cancelled, Generation
from minimind_v.model.llm import CausalLMOutput
from minimind_v.model.vlm import MiniMindVLM
from test_3v_template import make_think_tokenizer, think_model_dir  # noqa: F401 (a fixture)

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE trained on English only, so Chinese characters stay split into byte tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the cat sat on the mat, a red square left of a blue circle"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def tiny_config(vocab_size: int):
    cfg = presets.get_preset("tiny")
    vision = dict(cfg.vision.init, hidden_size=32, intermediate_size=64, num_hidden_layers=1, image_size=32,
                  patch_size=8)
    return dataclasses.replace(
        cfg, lm=dataclasses.replace(cfg.lm, vocab_size=vocab_size, hidden_size=64, num_hidden_layers=2),
        vision=dataclasses.replace(cfg.vision, init=vision, hidden_size=32, image_size=32, num_patches=16),
        image_token_len=16)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def engine(tokenizer) -> Engine:
    torch.manual_seed(0)
    model = MiniMindVLM(tiny_config(len(tokenizer)))
    with torch.no_grad():  # wide weights: greedy output changes token to token, so a cache bug shows
        for p in [*model.lm.parameters(), *model.projector.parameters()]:
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    return Engine(model, tokenizer, ImagePreprocessor.for_image_size(32), device="cpu")


def image(seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (40, 48, 3), generator=g, dtype=torch.uint8).numpy())


def prompt(engine: Engine, text: str, n_images: int = 0) -> list[int]:
    run = [engine.config.image_token_id] * engine.config.image_token_len
    ids = engine.tokenizer(text)["input_ids"]
    return [1] + run * n_images + ids


def greedy_without_cache(engine: Engine, ids: list[int], images: list[Image.Image], n: int) -> list[int]:
    """The reference: recompute the whole sequence for every new token."""
    pixels = engine.encode_images(images) if images else None
    out: list[int] = []
    with torch.inference_mode():
        for _ in range(n):
            logits = engine.model(torch.tensor([ids + out]), pixel_values=pixels).logits
            token = int(logits[0, -1].argmax())
            if token in engine.end_token_ids:
                break
            out.append(token)
    return out


@pytest.mark.parametrize("n_images", [0, 1])
def test_kv_cache_generation_equals_full_recomputation(engine, n_images):
    ids = prompt(engine, "the cat sat on", n_images)
    images = [image(1)] * n_images
    (done,) = engine.generate([ids], [images], SamplingParams(max_new_tokens=12))
    assert done.token_ids == greedy_without_cache(engine, ids, images, 12)
    assert done.prompt_tokens == len(ids)


def test_batched_left_padded_equals_one_by_one(engine):
    prompts = [prompt(engine, "a red square", 1), prompt(engine, "the cat sat on the mat left of"),
               prompt(engine, "blue", 2)]
    images = [[image(1)], [], [image(2), image(3)]]
    params = SamplingParams(max_new_tokens=10)
    batched = engine.generate(prompts, images, params)
    alone = [engine.generate([p], [imgs], params)[0] for p, imgs in zip(prompts, images)]
    assert [c.token_ids for c in batched] == [c.token_ids for c in alone]
    assert [c.prompt_tokens for c in batched] == [len(p) for p in prompts]
    assert len(set(batched[2].token_ids)) > 3  # a varied answer, not one token repeated


def test_the_image_reaches_the_model(engine):
    ids = prompt(engine, "the cat", 1)
    answers = [engine.generate([ids], [[image(seed)]], SamplingParams(max_new_tokens=6))[0] for seed in (1, 2)]
    assert answers[0].token_ids != answers[1].token_ids


def test_top_k_one_equals_greedy(engine):
    ids = prompt(engine, "the cat", 1)
    greedy = engine.generate([ids], [[image(4)]], SamplingParams(max_new_tokens=10))[0]
    top1 = engine.generate([ids], [[image(4)]], SamplingParams(max_new_tokens=10, temperature=1.5, top_k=1))[0]
    assert top1.token_ids == greedy.token_ids


def test_same_seed_same_sample_and_streaming_concatenates(engine):
    ids = prompt(engine, "a blue circle")
    params = SamplingParams(max_new_tokens=24, temperature=2.0, seed=7)
    deltas: list[str] = []
    first = engine.generate([ids], None, params, on_token=lambda row, d: deltas.append(d))[0]
    again = engine.generate([ids], None, params)[0]
    other = engine.generate([ids], None, dataclasses.replace(params, seed=8))[0]
    assert first.token_ids == again.token_ids and first.text == again.text
    assert other.token_ids != first.token_ids
    assert "".join(deltas) == first.text


def test_prompt_image_count_mismatch_is_a_user_error(engine):
    with pytest.raises(UserError, match="1 image placeholder runs but 0 images"):
        engine.generate([prompt(engine, "x", 1)], [[]], SamplingParams())


class ScriptedModel(torch.nn.Module):
    """Says a fixed token sequence whatever it is asked: makes stop and streaming checks exact."""

    def __init__(self, cfg, script: list[int]):
        super().__init__()
        self.cfg, self.script = cfg, script
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # gives the engine a device and dtype
        self.step = 0

    def forward(self, input_ids, past_key_values=None, logits_to_keep=None, **_) -> CausalLMOutput:
        self.step = 0 if past_key_values is None else self.step + 1
        logits = torch.zeros(input_ids.shape[0], 1, self.cfg.lm.vocab_size)
        logits[:, :, self.script[min(self.step, len(self.script) - 1)]] = 10.0
        return CausalLMOutput(logits, None, None, None, past_key_values=[])


def scripted(tokenizer, text: str, then: list[int] = ()) -> Engine:
    script = tokenizer(text)["input_ids"] + list(then)
    model = ScriptedModel(tiny_config(len(tokenizer)), script)
    return Engine(model, tokenizer, None, device="cpu")


def run(engine: Engine, **params) -> tuple[object, list[str]]:
    deltas: list[str] = []
    done = engine.generate([[1, 5, 6]], None, SamplingParams(**params), on_token=lambda row, d: deltas.append(d))
    return done[0], deltas


def test_end_token_stops_and_is_not_in_the_text(tokenizer):
    done, deltas = run(scripted(tokenizer, "the cat", then=[2, 40, 41]), max_new_tokens=50)
    assert (done.text, done.finish_reason) == ("the cat", "stop")
    assert done.completion_tokens == len(done.token_ids) + 1  # the end token counts, is not returned
    assert "".join(deltas) == "the cat"


def test_length_limit(tokenizer):
    done, _ = run(scripted(tokenizer, "the cat sat on the mat"), max_new_tokens=3)
    assert done.finish_reason == "length" and done.completion_tokens == 3 == len(done.token_ids)


def test_stop_string_spanning_tokens_cuts_text_and_stream(tokenizer):
    eng = scripted(tokenizer, "the cat sat on the mat")
    assert len(tokenizer("t s")["input_ids"]) > 1
    done, deltas = run(eng, max_new_tokens=50, stop=["zzz", "t s"])
    assert (done.text, done.finish_reason) == ("the ca", "stop")
    assert "".join(deltas) == "the ca"  # the streamed "t" was held back, never sent


def test_stop_string_prefix_at_the_end_is_flushed(tokenizer):
    done, deltas = run(scripted(tokenizer, "the cat", then=[2]), max_new_tokens=50, stop=["at home"])
    assert done.text == "the cat" == "".join(deltas)


def test_streaming_never_splits_a_utf8_character(tokenizer):
    text = "猫 sat 在垫子上"
    assert len(tokenizer(text)["input_ids"]) > len(text)  # several byte tokens per character
    done, deltas = run(scripted(tokenizer, text, then=[2]), max_new_tokens=50)
    assert done.text == text == "".join(deltas)
    assert all("\ufffd" not in d for d in deltas)


def test_repetition_penalty_is_ctrl_style():
    params = SamplingParams(repetition_penalty=2.0)
    seen = torch.tensor([[True, False, True, False]])
    token = _Sampler(params, seen, torch.device("cpu")).next(torch.tensor([[3.0, 2.0, -1.0, 1.0]]))
    assert int(token) == 1  # 3 -> 1.5 falls behind 2; the chosen token is now seen too
    assert seen.tolist() == [[True, True, True, False]]


def test_top_p_keeps_only_the_nucleus():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    logits = probs.log().expand(4000, 4)
    params = SamplingParams(temperature=1.0, top_p=0.7, seed=0)
    tokens = _Sampler(params, None, torch.device("cpu")).next(logits)
    assert set(tokens.tolist()) == {0, 1}
    assert abs((tokens == 0).float().mean().item() - 0.5 / 0.8) < 0.05


# Streaming from a worker thread (web and serve read the engine's pieces this way).
def streamed(engine: Engine, read_by="thread", wait_after_piece: threading.Event | None = None) -> Generation:
    """A Generation of the scripted engine's answer; with wait_after_piece, each piece waits for that event."""
    def generate(on_text):
        def on_token(_row: int, piece: str) -> None:
            on_text(piece)
            if wait_after_piece is not None:
                assert wait_after_piece.wait(30)
        return engine.generate([[1, 5, 6]], None, SamplingParams(max_new_tokens=50),
                               on_token if on_text is not None else None)[0]
    return Generation(generate, read_by=read_by)


def test_a_stream_read_on_another_thread_or_event_loop_is_the_whole_answer(tokenizer):
    eng = scripted(tokenizer, "the cat sat on the mat", then=[2])
    generation = streamed(eng)
    threading.Thread(target=generation.run).start()
    pieces = list(generation)
    assert len(pieces) > 1 and "".join(pieces) == generation.result.result().text == "the cat sat on the mat"

    async def read_on_the_loop() -> list[str]:
        on_loop = streamed(eng, read_by="event_loop")
        threading.Thread(target=on_loop.run).start()
        return [piece async for piece in on_loop]
    assert asyncio.run(read_on_the_loop()) == pieces


def test_a_reader_that_leaves_stops_the_generation_at_its_next_piece(tokenizer):
    eng = scripted(tokenizer, "the cat sat on the mat")  # no end token: 50 tokens unless stopped
    left = threading.Event()
    generation = streamed(eng, wait_after_piece=left)
    worker = threading.Thread(target=generation.run)
    worker.start()
    with generation:
        first = next(iter(generation))
    left.set()
    worker.join(30)
    assert first and isinstance(generation.result.exception(), Cancelled)
    assert eng.model.step < 10


def test_a_generation_stopped_before_it_starts_never_runs_and_errors_reach_the_reader():
    calls: list[object] = []
    never = Generation(calls.append)
    never.stop()
    never.run()
    assert list(never) == [] and never.result.cancelled() and calls == []

    def refused(on_text):
        raise UserError("prompt of 9 tokens does not fit")
    failing = Generation(refused)
    threading.Thread(target=failing.run).start()
    assert list(failing) == []
    with pytest.raises(UserError, match="does not fit"):
        failing.result.result()


def test_open_thinking_opens_the_think_block_of_a_think_template(think_model_dir):
    engine = Engine.load(think_model_dir, "cpu")
    question, images = [{"role": "user", "content": "<image>\nwhat color"}], [image(0)]
    closed, opened = engine.prompt(question, 1), engine.prompt(question, 1, open_thinking=True)
    assert engine.thinks and closed == engine.prompt(question, 1, open_thinking=False)
    assert engine.tokenizer.decode(closed).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert engine.tokenizer.decode(opened).endswith("<|im_start|>assistant\n<think>\n")
    assert engine.inputs(question, images, open_thinking=True)[0][0].tolist() == opened
    params = SamplingParams(max_new_tokens=4)
    assert engine.chat(question, images, params, open_thinking=True).prompt_tokens == len(opened)
    assert engine.chat(question, images, params).prompt_tokens == len(closed)


def test_open_thinking_needs_a_think_block(tiny_model_dir):
    engine = Engine.load(tiny_model_dir, "cpu")
    question = [{"role": "user", "content": "the cat"}]
    assert not engine.thinks
    with pytest.raises(UserError, match="^open_thinking: this model's chat template has no think block"):
        engine.prompt(question, 0, open_thinking=True)
    with pytest.raises(UserError, match="^--open-thinking: "):
        engine.check_open_thinking(True, "--open-thinking")
    assert engine.prompt(question, 0, open_thinking=False) == engine.prompt(question, 0)  # off: what it does


def test_a_reasoned_answer_keeps_its_close_tag_for_the_history():
    from minimind_v.data.template import build_prompt

    tokenizer = make_think_tokenizer()
    done, deltas = run(scripted(tokenizer, "it is red\n</think>\n\nred", then=[2]), max_new_tokens=50)
    assert done.text == "".join(deltas) == "it is red\n</think>\n\nred"  # `</think>` is not a special token
    history = [{"role": "user", "content": "what color"}, {"role": "assistant", "content": done.text},
               {"role": "user", "content": "sure?"}]
    again = tokenizer.decode(build_prompt(tokenizer, history, 3, 4))
    assert "<|im_start|>assistant\n<think>\nit is red\n</think>\n\nred<|im_end|>" in again
