"""What a command runs: shared CLI flags, input checks, the run-and-save sequence, reports and the quality grid.
May import every layer above (base, place, prune, evaluate); never tokens, skip or embedded."""
