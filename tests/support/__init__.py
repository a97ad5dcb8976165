"""Shared test helpers: reference data access, recording backend, fakes of TensorRT and Triton's python backend."""
