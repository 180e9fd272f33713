"""parcae.eval: metrics of a trained model — text perplexity, CORE / Core-Extended, the lm-evaluation-harness
adapter — at chosen loop counts, and loading a model from a checkpoint without a Trainer (``checkpoint``)."""
