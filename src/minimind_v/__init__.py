"""minimind-v: a tiny vision-language model you train from scratch."""
