"""Triton Inference Server model repository generator and orchestrator model."""
