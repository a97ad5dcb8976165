"""ONNX -> TensorRT plans, the engine cache and the engine runner (see kvt.runtime.stages)."""
