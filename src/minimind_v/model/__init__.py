"""Architecture only: the language model, the vision tower, the projector and the VLM that joins them."""
