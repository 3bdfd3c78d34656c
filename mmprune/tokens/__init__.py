"""Visual-token pruning at inference (FitPrune): recipes searched from calibration attention, applied by hooks.
May import mmprune.base and mmprune.prune."""
