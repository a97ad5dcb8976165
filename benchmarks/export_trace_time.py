"""CPU seconds of exporting one stage's graph (torch.onnx.export only), with or without the exact cuts.

    python benchmarks/export_trace_time.py unet_t2v_image 1   # cuts (the exported form)
    python benchmarks/export_trace_time.py unet_t2v_image 0   # the official per-row form
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from kvt.export.graph_export import export_graph
from kvt.export.source import ExportSource
from kvt.models.stage_modules import stage_module, stage_table_for


def main() -> None:
    stage, cuts = sys.argv[1], sys.argv[2] == "1"
    opened = ExportSource(sys.argv[3] if len(sys.argv) > 3 else "tiny").open()
    spec = stage_table_for(opened.config)[stage]
    network = opened.build(spec.network)
    start = time.process_time()
    with tempfile.TemporaryDirectory() as folder:
        export_graph(stage_module(stage, network, cuts), spec, Path(folder) / "graph.onnx")
    print(f"{stage} {'cuts' if cuts else 'per-row'}: {time.process_time() - start:.1f} CPU-s")


if __name__ == "__main__":
    main()
