"""Attention skipping (EAS): skipped attention blocks and the propagation-of-information adapter.
May import mmprune.base and mmprune.prune."""
