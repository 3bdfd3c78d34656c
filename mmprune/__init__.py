"""Model-agnostic core for post-training pruning of multimodal LLM decoders (TAMP and baselines)."""

__version__ = "0.1.0"
