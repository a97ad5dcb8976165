"""``kvt rehearse``: the production deployment (TensorRT plans served by Triton), run on a machine
without a GPU: stand-in plans with the profiles ``kvt build`` records, the repository ``kvt triton-repo``
generates, each ``tensorrt_plan`` stage served by a python model that behaves as Triton's TensorRT
backend does, on the tritonserver bundled in nvidia-pytriton."""
