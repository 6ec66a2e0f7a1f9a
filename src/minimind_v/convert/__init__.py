"""Converters between model directories and other formats: the original .pth, transformers."""
