"""Shared pytest configuration."""

import torch

# One intra-op thread: the networks under test are tiny, so a second thread buys little, and on a shared
# 2-core machine two-thread OpenMP barriers were measured to stall a 0.05 s forward for seconds. The
# reference tolerances cover the 1-thread reduction order (reference README, "1 thread" column).
torch.set_num_threads(1)
