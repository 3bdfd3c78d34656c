"""Layer-wise sparsity allocations (uniform/waterfill/inverse rules, DAS, OWL, ECoFLaP), one file each.
May import mmprune.base, mmprune.place and the rest of mmprune.prune."""
