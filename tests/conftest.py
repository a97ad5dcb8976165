"""Shared pytest configuration: deterministic threads, the reference folder on sys.path helpers."""

import torch

# The reference data was produced with 2 threads; parity does not depend on it (tolerances cover the
# 1-thread reduction order), but keeping it fixed keeps reruns bit-identical.
torch.set_num_threads(2)
