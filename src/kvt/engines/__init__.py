"""ONNX -> TensorRT plans, the engine cache and the engine runner (see kvt.contract.stages)."""
