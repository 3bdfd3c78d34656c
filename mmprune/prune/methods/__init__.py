"""One file per pruner (magnitude, Wanda, SparseGPT): how a block's linears get their masks and weights.
May import mmprune.base, mmprune.place and the rest of mmprune.prune."""
