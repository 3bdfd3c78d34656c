"""Weight pruning of a decoder: calibration capture, the block-by-block driver, statistics, masks, the
methods, allocations and token selections, and the pipeline that composes them. May import base, place."""
