"""Evaluation shared by both model families: answer scoring and the real-text perplexity.
May import mmprune.base, mmprune.place and mmprune.prune."""
