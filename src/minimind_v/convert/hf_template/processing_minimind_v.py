"""MiniMind-V processor for transformers (trust_remote_code). Self-contained: no minimind_v import.

    processor = AutoProcessor.from_pretrained(dir, trust_remote_code=True)
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    inputs = processor(text=text, images=[image], return_tensors="pt")
    model.generate(**inputs, max_new_tokens=64, do_sample=False)

The chat template is the tokenizer's own. A message's content is a string, where each `<image>` stands for
the next image, or transformers' list of parts: `{"type": "text", "text": ...}` and `{"type": "image"}`,
joined by newlines with one `<image>` per image part, as minimind-v's OpenAI server joins them. Each
`<image>` becomes `image_token_len` copies of `image_token_id` at the token level (never through BPE,
which would merge repeated placeholder characters); batches are left-padded for `generate`. A model
exported with `images_first` reads each user turn's images before its text: apply_chat_template moves them
there, whatever the order given, as minimind-v does in training and at inference; a labelled image line
("first: <image>") moves whole, its label with it.
"""

import json
import re

import torch
from transformers import AutoImageProcessor, AutoTokenizer, BatchFeature
from transformers.processing_utils import ProcessorMixin
from transformers.utils import cached_file

SETTINGS = ("image_marker", "image_token_id", "image_token_len", "images_first")


def images_before_text(content, marker):
    """The markers moved before the text, one per line, in their order; a labelled line ("first: <image>": a few
    words, a colon, the marker) moves whole, so its label still names the image that follows."""
    labelled = re.compile(f"[^\\n:：<]{{1,24}}[:：] ?{re.escape(marker)}")
    front, text = [], []
    for line in content.split("\n"):
        if labelled.fullmatch(line):
            front.append(line)
            continue
        front.extend([marker] * line.count(marker))
        rest = line.replace(marker, "")
        if rest or marker not in line:
            text.append(rest)
    return "\n".join(front + text)


class MiniMindVProcessor(ProcessorMixin):
    def __init__(self, image_processor=None, tokenizer=None, image_marker="<image>", image_token_id=None,
                 image_token_len=None, images_first=False, chat_template=None, **kwargs):
        self.image_marker = image_marker
        self.image_token_id = image_token_id
        self.image_token_len = image_token_len
        self.images_first = images_first
        super().__init__(image_processor, tokenizer, chat_template=chat_template)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """The tokenizer and image processor of an export, and the placeholder settings of its processor_config.json.

        Loads each part with transformers' own auto classes rather than ProcessorMixin's generic loader, whose
        layout rules change between releases.
        """
        kwargs.pop("_from_auto", None)
        path = cached_file(pretrained_model_name_or_path, "processor_config.json",
                           **{k: v for k, v in kwargs.items() if k in ("cache_dir", "revision", "token",
                                                                       "local_files_only", "subfolder")})
        with open(path, encoding="utf-8") as f:
            settings = {k: v for k, v in json.load(f).items() if k in SETTINGS}
        tokenizer = AutoTokenizer.from_pretrained(pretrained_model_name_or_path, **kwargs)
        kwargs.pop("trust_remote_code", None)
        image_processor = AutoImageProcessor.from_pretrained(pretrained_model_name_or_path, **kwargs)
        return cls(image_processor=image_processor, tokenizer=tokenizer, **settings)

    def __call__(self, text=None, images=None, return_tensors="pt", **kwargs):
        """Prompt text(s) with `<image>` markers -> input_ids and attention_mask (left-padded), pixel_values."""
        if text is None:
            raise ValueError("MiniMindVProcessor needs text: the prompt, with one <image> per image")
        texts = [text] if isinstance(text, str) else list(text)
        images = [] if images is None else _flatten_images(images)
        rows = [self._encode(t) for t in texts]
        markers = sum(t.count(self.image_marker) for t in texts)
        if markers != len(images):
            raise ValueError(f"{markers} {self.image_marker} marker(s) in the text for {len(images)} image(s)")
        width = max(map(len, rows))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        data = {"input_ids": [[pad] * (width - len(r)) + r for r in rows],
                "attention_mask": [[0] * (width - len(r)) + [1] * len(r) for r in rows]}
        if images:
            data["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        if return_tensors is None:
            return BatchFeature(data)
        data["input_ids"] = torch.tensor(data["input_ids"])
        data["attention_mask"] = torch.tensor(data["attention_mask"])
        return BatchFeature(data, tensor_type=return_tensors)

    def _encode(self, text):
        pieces = text.split(self.image_marker)
        texts = [p for p in pieces if p]
        encoded = self.tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
        ids, next_piece = [], iter(encoded)
        for k, piece in enumerate(pieces):
            if k:
                ids += [self.image_token_id] * self.image_token_len
            if piece:
                ids += next(next_piece)
        return ids

    def apply_chat_template(self, conversation, chat_template=None, add_generation_prompt=False, tokenize=False,
                            return_dict=False, return_tensors="pt", **kwargs):
        """The tokenizer's chat template over string or list-of-parts messages; `tokenize=True` also runs
        `__call__` on the images named in the parts (`"image"`, `"url"` or `"path"`)."""
        batched = bool(conversation) and isinstance(conversation[0], (list, tuple))
        conversations = conversation if batched else [conversation]
        flat = [[self._flatten_message(m) for m in c] for c in conversations]
        texts = [self.tokenizer.apply_chat_template(c, chat_template=chat_template, tokenize=False,
                                                    add_generation_prompt=add_generation_prompt, **kwargs)
                 for c in flat]
        if not tokenize:
            return texts if batched else texts[0]
        images = [_load(part) for c in conversations for m in c for part in _parts(m) if part["type"] == "image"]
        out = self(text=texts, images=images or None, return_tensors=return_tensors)
        return out if return_dict else out["input_ids"]

    def _flatten_message(self, message):
        """String content, parts joined by newlines; with images_first (the model's setting, applied as
        minimind-v applies it), a user turn's images moved before its text."""
        if isinstance(message["content"], str):
            content = message["content"]
        else:
            content = "\n".join(self._part_text(part) for part in message["content"])
        n = content.count(self.image_marker)
        if self.images_first and message["role"] == "user" and n:
            content = images_before_text(content, self.image_marker)
        return {**message, "content": content}

    def _part_text(self, part):
        if part["type"] == "text":
            return part["text"]
        if part["type"] == "image":
            return self.image_marker
        raise ValueError(f"content part type {part['type']!r}: expected 'text' or 'image'")

    @property
    def model_input_names(self):
        return ["input_ids", "attention_mask", "pixel_values"]


def _parts(message):
    return [] if isinstance(message["content"], str) else message["content"]


def _flatten_images(images):
    if isinstance(images, (list, tuple)):
        return [image for item in images for image in _flatten_images(item)]
    return [images]


def _load(part):
    from transformers.image_utils import load_image

    for key in ("image", "url", "path"):
        if part.get(key) is not None:
            return load_image(part[key])
    raise ValueError("an image part of a tokenized chat needs the image itself: 'image', 'url' or 'path'")
