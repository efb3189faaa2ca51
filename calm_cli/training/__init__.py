"""Training loop, objectives, data preparation and tokenizer training. Imports models, io, runtime and eval."""
