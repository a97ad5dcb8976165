"""A stand-in for ``triton_python_backend_utils``: the parts kvt's python models use, without a server.

Install it with ``monkeypatch.setitem(sys.modules, "triton_python_backend_utils", FakePbUtils)``; a
request is then a dict of input name -> :class:`FakePbUtils.Tensor`.
"""

from __future__ import annotations

import numpy as np


class FakePbUtils:
    """The parts of triton_python_backend_utils the python-ort stage model uses (no server)."""

    class Tensor:
        def __init__(self, name, array):
            self.name, self._array = name, np.asarray(array)

        def as_numpy(self):
            return self._array

    class TritonError(Exception):
        pass

    class InferenceResponse:
        def __init__(self, output_tensors=(), error=None):
            self.outputs = {t.name: t.as_numpy() for t in output_tensors}
            self.error = error

    @staticmethod
    def get_input_tensor_by_name(request, name):
        return request.get(name)
