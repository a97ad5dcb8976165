"""Writing results: JSON, Markdown tables and PNG plots, each written to a temporary name and renamed.

Every result file carries its provenance (date, machine, load, versions, the command line), so a figure
copied into RESULTS.md can always be traced back to the run that produced it.
"""

from __future__ import annotations

import datetime as _dt
import os
import platform
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from kvt.contract.files import atomic_path, write_text_atomic
from kvt.contract.files import write_json_atomic as _write_json_atomic

__all__ = ["write_json_atomic", "write_text_atomic", "save_figure_atomic"]


def write_json_atomic(path: str | Path, data: object) -> Path:
    return _write_json_atomic(path, data, indent=2)


def save_figure_atomic(figure: Any, path: str | Path) -> Path:
    with atomic_path(path) as tmp:
        figure.savefig(tmp, dpi=110, bbox_inches="tight")
    return Path(path)


def _command(argv: Sequence[str] | None) -> str:
    """The command line of this run: ``kvt bench ...`` for the CLI, ``python -m kvt.benchmarks.X ...``
    for a benchmark module run directly; ``argv`` (without the program) as given."""
    if argv is not None:
        return "kvt bench " + shlex.join(list(argv))
    program = Path(sys.argv[0])
    if program.suffix == ".py" and "kvt" in program.parts:
        module = ".".join(program.with_suffix("").parts[program.parts.index("kvt"):])
        return shlex.join(["python", "-m", module, *sys.argv[1:]])
    return shlex.join([program.name, *sys.argv[1:]])


def provenance(device: torch.device, argv: Sequence[str] | None = None) -> dict:
    """Date, machine, load, versions and the command of this run."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": _command(argv),
        "host": platform.node(), "python": platform.python_version(), "torch": torch.__version__,
        "device": str(device), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        pass
    try:
        import psutil

        info["ram_gib"] = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    return info


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:,.1f}"


def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def provenance_markdown(info: dict) -> str:
    load = info.get("load_average")
    lines = [f"- Date: {info['date']}. Device: {info.get('gpu', info['device'])}; host {info['host']}, "
             f"{info['cpu_count']} CPU cores, torch {info['torch']} ({info['torch_threads']} threads)"
             + (f", load average at start {load}" if load else "") + ".",
             f"- Command: `{info['command']}`"]
    return "\n".join(lines)


def plot_bars(path: str | Path, title: str, labels: Sequence[str], series: dict[str, Sequence[float]],
              ylabel: str, log: bool = False) -> Path:
    """Grouped bars: one group per label, one bar per series."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6.0, 0.9 * len(labels) + 2), 4))
    width = 0.8 / max(len(series), 1)
    for index, (name, values) in enumerate(series.items()):
        positions = [i + (index - (len(series) - 1) / 2) * width for i in range(len(labels))]
        axis.bar(positions, values, width=width, label=name)
    axis.set_xticks(range(len(labels)))
    axis.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    if log:
        axis.set_yscale("log")
    if len(series) > 1:
        axis.legend(fontsize=8)
    try:
        return save_figure_atomic(figure, path)
    finally:
        plt.close(figure)


def plot_stacked(path: str | Path, title: str, labels: Sequence[str], parts: Mapping[str, Sequence[float]],
                 ylabel: str) -> Path:
    """Stacked bars: one bar per label, one segment per part (e.g. stage seconds of one request)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 3), 4))
    bottom = [0.0] * len(labels)
    for name, values in parts.items():
        axis.bar(range(len(labels)), values, bottom=bottom, label=name)
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.set_xticks(range(len(labels)))
    axis.set_xticklabels(labels, rotation=20, ha="right", fontsize=8)
    axis.set_ylabel(ylabel)
    axis.set_title(title, fontsize=10)
    axis.legend(fontsize=7, bbox_to_anchor=(1.01, 1), loc="upper left")
    try:
        return save_figure_atomic(figure, path)
    finally:
        plt.close(figure)
