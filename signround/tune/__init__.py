"""Per-block tuners (RTN, SignRound) and the block-by-block pipeline."""
