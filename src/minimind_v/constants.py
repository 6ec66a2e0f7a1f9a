"""The few values that data, model, training and inference must agree on, each declared once."""

IGNORE_INDEX = -100
"""Label of a token the loss does not look at (PyTorch's cross-entropy default)."""
IMAGE_MARKER = "<image>"
"""Where an image goes in a conversation's text; never tokenised, replaced by placeholder tokens."""
END_TOKENS = ("<|im_end|>", "<|endoftext|>")
"""Tokens that end an answer (the ChatML end of turn, and the end of text)."""
