"""Data: formats, chat templates and loss masks, images, batching, the synthetic world, the tokenizer.

Import the submodules directly (minimind_v.data.dataset, ...): this package imports nothing, so
`minimind-v --help` and the synthetic-world writer stay light.
"""
