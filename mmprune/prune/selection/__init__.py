"""Token selections: which calibration tokens a pruner's statistic is taken over (AMIA, ATV), one file each.
May import mmprune.base and the rest of mmprune.prune."""
