"""What can be checked here of the container and cluster deployment: the Dockerfile is the documented
one and runs a valid `kvt serve`; the Kubernetes manifests carry the fields a GPU deployment needs; the
perf_analyzer input matches the orchestrator's inputs and what the repository serves."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from kvt.cli.main import build_parser
from kvt.contract.profiles import coverage, profiles_from_data
from kvt.contract.stages import FPS_FRAMES, StageTable
from kvt.formats.triton_repo import ORCHESTRATOR_MODEL, PIPELINE_FILE, PYTHON_ORT
from kvt.serving import protocol
from kvt.serving.generator.configs import RepositoryOptions
from kvt.serving.generator.repository import PERF_INPUT_FILE, build_repository

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
MANIFEST = ROOT / "deploy" / "kubernetes" / "kvt-triton.yaml"


def _instructions(text: str) -> list[str]:
    """Dockerfile instructions with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [" ".join(line.split()) for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_dockerfile_is_the_documented_one():
    docs = (ROOT / "docs" / "TRITON.md").read_text()
    block = re.search(r"```dockerfile\n(.*?)```", docs, re.S).group(1)
    assert _instructions(block) == _instructions(DOCKERFILE.read_text())
    pyproject = (ROOT / "pyproject.toml").read_text()
    pin = re.search(r'"(torch==[0-9.]+)"', pyproject).group(1)
    run = next(i for i in _instructions(DOCKERFILE.read_text()) if i.startswith("RUN "))
    assert f"python3 -m pip install {pin} " in run  # the torch pyproject.toml pins, with python3


def _serve_args(command: list[str]) -> object:
    assert command[:2] == ["kvt", "serve"]
    return build_parser().parse_args(command[1:])


def test_container_commands_are_valid_kvt_serve_commands():
    cmd = next(i for i in _instructions(DOCKERFILE.read_text()) if i.startswith("CMD "))
    args = _serve_args(json.loads(cmd[4:]))
    assert args.repository == "/models" and args.exit_timeout == 900


def test_kubernetes_deployment_fields():
    docs = list(yaml.safe_load_all(MANIFEST.read_text()))
    kinds = {d["kind"]: d for d in docs}
    pod = kinds["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}
    assert container["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    args = _serve_args(container["command"])
    assert pod["terminationGracePeriodSeconds"] > args.exit_timeout  # requests finish before the kill
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    mount = next(m for m in container["volumeMounts"] if m["name"] == "dshm")
    assert mount["mountPath"] == "/dev/shm" and shm["emptyDir"]["medium"] == "Memory"
    size = int(shm["emptyDir"]["sizeLimit"].rstrip("Gi")) * 2**30
    frames = FPS_FRAMES["high"] * 1024 * 1024 * 3  # the largest response of the full preset
    assert size >= 2 * frames  # both orchestrators may answer at once
    service = kinds["Service"]["spec"]
    assert {p["port"] for p in service["ports"]} == {8000, 8001, 8002}
    assert service["selector"] == kinds["Deployment"]["spec"]["selector"]["matchLabels"]


def test_perf_analyzer_input_matches_the_orchestrator(tmp_path, tiny_export_fp32):
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    text_format = pytest.importorskip("google.protobuf.text_format")
    repo = build_repository(tmp_path / "repo", tiny_export_fp32, options=RepositoryOptions(PYTHON_ORT))
    data = json.loads((repo / PERF_INPUT_FILE).read_text())["data"]
    config = text_format.Parse((repo / ORCHESTRATOR_MODEL / "config.pbtxt").read_text(), pb.ModelConfig())
    inputs = {i.name: i for i in config.input}
    wire = {f.name: f for f in protocol.SCALAR_FIELDS}
    meta = json.loads((repo / ORCHESTRATOR_MODEL / "1" / PIPELINE_FILE).read_text())
    cover = coverage(StageTable.from_summary(meta["model"]),
                     {s: tuple(profiles_from_data(plan) for plan in plans) for s, plans in meta["served_profiles"].items()})
    assert data and len({(e["WIDTH"]["content"][0], e["HEIGHT"]["content"][0], e["FPS"]["content"][0])
                         for e in data}) == len(data)
    assert {e["FPS"]["content"][0] for e in data} == set(config.parameters["fps_modes"].string_value.split(","))
    for entry in data:
        for name, value in entry.items():
            assert name in inputs, name  # an input of the orchestrator
            assert value["shape"] == list(inputs[name].dims)
            numpy = wire[name].numpy
            assert all(isinstance(v, str) if wire[name].wire_type == "BYTES" else
                       isinstance(numpy(v).item(), int) for v in value["content"])
        size = (entry["WIDTH"]["content"][0], entry["HEIGHT"]["content"][0])
        assert size in cover.sizes[(entry["FPS"]["content"][0], False)]  # a request the repository serves
    assert protocol.PROMPT in {n for e in data for n in e}
