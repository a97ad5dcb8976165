"""Torch -> ONNX export of every stage in the stage table (see kvt.contract.stages)."""
