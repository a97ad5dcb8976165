"""Test-only Triton python model: a stage model with faults injected on purpose.

It wraps the real stage model (``real_model.py`` beside it) and, before each call, reads the file
``fault`` in its own version folder, which the test writes: empty or missing = behave, ``raise`` =
fail every request, ``sleep:S`` = wait S seconds, then answer. The file lives in the repository the
test generated; clients cannot name it.
"""

import importlib.util
import os
import time

_HERE = os.path.dirname(os.path.abspath(__file__))
_spec = importlib.util.spec_from_file_location("kvt_real_stage_model", os.path.join(_HERE, "real_model.py"))
_real = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_real)


class TritonPythonModel(_real.TritonPythonModel):
    def execute(self, requests):
        try:
            with open(os.path.join(_HERE, "fault")) as handle:
                fault = handle.read().strip()
        except FileNotFoundError:
            fault = ""
        if fault == "raise":
            raise RuntimeError("injected fault: this stage model fails on purpose")
        if fault.startswith("sleep:"):
            time.sleep(float(fault.split(":", 1)[1]))
        return super().execute(requests)
