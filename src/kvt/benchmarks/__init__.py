"""Benchmarks: per-stage latency, end-to-end runs split by stage, Triton client latency, FLOPs, memory.

Entry point: ``python -m kvt.benchmarks <stage|e2e|flops|triton> ...`` (also ``kvt bench``). Results go
to a folder as JSON, a Markdown table and PNG plots; benchmarks/RESULTS.md records them with provenance.
"""
