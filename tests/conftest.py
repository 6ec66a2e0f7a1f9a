"""Hermetic tests: no network, CPU only, tiny sizes."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # also for the CLI subprocesses some tests start
# The up-front pass's encodings go to a folder of this session, never to the user's ~/.cache.
os.environ.setdefault("MINIMIND_V_CACHE", tempfile.mkdtemp(prefix="minimind-v-tests-"))
atexit.register(shutil.rmtree, os.environ["MINIMIND_V_CACHE"], True)

import torch  # noqa: E402

# Tiny models gain nothing from intra-op threads, and spinning threads stall on a busy 2-core machine.
torch.set_num_threads(1)


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def original_tokenizer_dir():
    """The original MiniMind-V tokenizer, from shared/ beside the checkout (never committed into it); skips if absent."""
    from pathlib import Path

    for shared in (Path(__file__).resolve().parents[2] / "shared", Path("/work/shared")):
        path = shared / "reference" / "minimind2-v-tokenizer"
        if path.is_dir():
            return path
    pytest.skip("original tokenizer not found in shared/reference/ beside the checkout")


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory):
    """A throwaway byte-level BPE tokenizer (minimind-v's own: ids 0-3 special, ChatML), trained in-process."""
    from minimind_v.data.tokenizer import save_tokenizer, train_tokenizer

    words = "the a red blue green square circle triangle is on left right of what color shape size 你好 图片".split()
    texts = [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(10)) for i in range(200)]
    out = tmp_path_factory.mktemp("tokenizer")
    save_tokenizer(train_tokenizer(iter(texts), 400), out)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer_dir):
    """A complete model directory (config, weights, tokenizer, vision/) of a shrunken tiny preset, random weights.

    The LLM's matrices are drawn wide (std 0.2) so greedy answers vary token to token: a bug in caching,
    padding or export then changes the tokens instead of hiding behind one repeated token.
    """
    import dataclasses

    from minimind_v.data.tokenizer import load_tokenizer
    from minimind_v.modeldir import MiniMindVLM
    from minimind_v.presets import get_preset

    tokenizer = load_tokenizer(tokenizer_dir)
    cfg = get_preset("tiny")
    cfg = dataclasses.replace(
        cfg, lm=dataclasses.replace(cfg.lm, vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2),
        vision=dataclasses.replace(cfg.vision, init=dict(cfg.vision.init, hidden_size=32, intermediate_size=64,
                                                         num_hidden_layers=1, image_size=32, patch_size=8),
                                   hidden_size=32, image_size=32, num_patches=16, position_init_std=None),
        image_token_len=16)
    torch.manual_seed(0)
    model = MiniMindVLM(cfg)
    with torch.no_grad():
        for p in [*model.lm.parameters(), *model.projector.parameters()]:
            if p.dim() == 2:
                p.normal_(0.0, 0.2)
    out = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(out, tokenizer=tokenizer)
    return out


@pytest.fixture(scope="session")
def images_first_model_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with images_first set: each user turn's images are read before its text."""
    import json
    import shutil

    out = tmp_path_factory.mktemp("images-first") / "model"
    shutil.copytree(tiny_model_dir, out)
    config = json.loads((out / "config.json").read_text())
    config["images_first"] = True
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out
