"""kandinsky-video-trt: Kandinsky Video 1.1 (FusionFrames) as a production deployment.

The package namespace ``kvt`` maps the repository's top-level folders:
``kvt.models`` (PyTorch networks and checkpoints), ``kvt.runtime`` (stage table, backends,
pipeline, CLI), ``kvt.export`` (ONNX), ``kvt.engines`` (TensorRT) and ``kvt.serving``.
Importing ``kvt`` is cheap: heavy optional dependencies are imported where they are used.
"""

__version__ = "0.1.0"
