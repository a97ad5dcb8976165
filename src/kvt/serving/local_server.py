"""Start a ``tritonserver`` on loopback, for ``kvt serve``, ``kvt rehearse`` and the tests: the system's
(the NGC image's ``/opt/tritonserver``) where there is one, else the one the nvidia-pytriton wheel bundles.

The bundled build has the python backend only (enough for a python-ort repository and a rehearsal) and
needs a few things set up to run outside pytriton (see the project's notes, "Running a real Triton Inference Server on a
CPU-only machine"): a private backend folder holding the python backend and the stub for this Python,
the venv's ``bin`` first on PATH and the interpreter's libdir plus ``nvidia_pytriton.libs`` on
LD_LIBRARY_PATH, numpy < 2, free ports. The server's python-backend shared-memory regions get a prefix
unique to this server, so exactly its leftovers are removed from /dev/shm on shutdown.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

from kvt.contract.errors import UnavailableError

SHM_DIR = Path("/dev/shm")


class ServerError(UnavailableError):
    """tritonserver could not be found, started or reached."""


@dataclass(frozen=True)
class BundledTriton:
    """Paths inside an installed nvidia-pytriton."""

    binary: Path
    python_backend: Path  # folder with libtriton_python.so and triton_python_backend_utils.py
    stub: Path  # triton_python_backend_stub for this Python version
    libs: Path  # nvidia_pytriton.libs (the stub's and the server's shared libraries)


def find_bundled_triton() -> BundledTriton:
    """The server bundled in nvidia-pytriton, or a ServerError that says how to install it."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    hint = ("install it with `pip install --no-deps nvidia-pytriton==0.7.0` (it bundles tritonserver with "
            "the python backend), or use a Triton container")
    if spec is None or not spec.submodule_search_locations:
        raise ServerError(f"nvidia-pytriton is not installed: {hint}")
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    found = BundledTriton(binary=root / "bin" / "tritonserver", python_backend=root / "backends" / "python",
                          stub=root / "python_backend_stubs" / version / "triton_python_backend_stub",
                          libs=root.parent.parent / "nvidia_pytriton.libs")
    for path in (found.binary, found.python_backend / "libtriton_python.so", found.stub):
        if not path.exists():
            raise ServerError(f"{path}: missing from nvidia-pytriton (Python {version}); {hint}")
    return found


SYSTEM_TRITON = Path("/opt/tritonserver/bin/tritonserver")


def find_system_triton() -> Path | None:
    """The system's tritonserver (on PATH or at the NGC image's path), or None."""
    found = shutil.which("tritonserver")
    if found:
        return Path(found)
    return SYSTEM_TRITON if SYSTEM_TRITON.is_file() else None


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _check_numpy() -> None:
    import numpy

    if int(numpy.__version__.split(".")[0]) >= 2:
        raise ServerError(f"numpy {numpy.__version__}: the bundled python backend (Triton 2.51) returns "
                          "empty outputs with numpy 2; install numpy<2")


class TritonServer:
    """One tritonserver process on ``host`` (loopback by default) serving ``repository``.

    Use as a context manager, or call :meth:`start` and :meth:`stop`. ``log_path`` receives the server's
    output (default: a file in the private temporary folder, shown in errors).
    """

    def __init__(self, repository: str | Path, host: str = "127.0.0.1", http_port: int | None = None,
                 grpc_port: int | None = None, log_verbose: int = 0, extra_args: tuple[str, ...] = (),
                 startup_timeout: float = 180.0, metrics_port: int | None = None, metrics: bool = False,
                 binary: str | Path | None = None, log_path: Path | None = None) -> None:
        """``metrics``: serve Prometheus metrics on ``metrics_port`` (default: a free port). ``binary``:
        the tritonserver to run; "bundled" for nvidia-pytriton's; default: the system's where there is
        one, else the bundled one. ``extra_args`` go to tritonserver last (they override ours)."""
        self.repository = Path(repository)
        self.host = host
        self.http_port = http_port or free_port(host)
        self.grpc_port = grpc_port or free_port(host)
        self.metrics = metrics
        self.metrics_port = (metrics_port or free_port(host)) if metrics else None
        self.binary = binary
        self.log_to = log_path
        self.command: list[str] = []
        self.log_verbose = log_verbose
        self.extra_args = tuple(extra_args)
        self.startup_timeout = startup_timeout
        self.shm_prefix = f"kvt_{uuid.uuid4().hex[:12]}_"
        self.process: subprocess.Popen | None = None
        self._workdir: Path | None = None
        self.log_path: Path | None = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str | None:
        return f"http://{self.host}:{self.metrics_port}/metrics" if self.metrics_port else None

    def _backends(self, bundled: BundledTriton) -> Path:
        """A private backend folder: the bundled python backend plus the stub of this Python."""
        assert self._workdir is not None  # set by start() before it calls this
        folder = self._workdir / "backends" / "python"
        folder.mkdir(parents=True)
        for item in bundled.python_backend.iterdir():
            if item.is_file():
                os.symlink(item, folder / item.name)
        shutil.copy2(bundled.stub, folder / bundled.stub.name)
        return folder.parent

    def _environment(self, bundled: BundledTriton) -> dict[str, str]:
        env = dict(os.environ)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        libs = [sysconfig.get_config_var("LIBDIR") or "", str(bundled.libs), env.get("LD_LIBRARY_PATH", "")]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in libs if p)
        env.setdefault("OMP_NUM_THREADS", "1")
        return env

    def start(self) -> TritonServer:
        if self.process is not None:
            raise ServerError("this server is already started")
        if not self.repository.is_dir():
            raise ServerError(f"model repository {self.repository} does not exist")
        _check_numpy()
        self._workdir = Path(tempfile.mkdtemp(prefix="kvt_triton_"))
        self.log_path = self.log_to or self._workdir / "tritonserver.log"
        system = None if self.binary == "bundled" else (Path(self.binary) if self.binary else find_system_triton())
        common = [f"--model-repository={self.repository}",
                  f"--http-address={self.host}", f"--http-port={self.http_port}",
                  f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
                  *(["--allow-metrics=true", f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}"]
                    if self.metrics else ["--allow-metrics=false"]),
                  f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
                  f"--log-verbose={self.log_verbose}"]
        if system is not None:  # an installed server: its own backends and memory settings
            command, env = [str(system), *common, *self.extra_args], dict(os.environ)
        else:  # the CPU build bundled in nvidia-pytriton (no GPU: no pinned or CUDA memory pools)
            bundled = find_bundled_triton()
            command = [str(bundled.binary), *common, f"--backend-directory={self._backends(bundled)}",
                       "--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0",
                       *(["--allow-gpu-metrics=false"] if self.metrics else []), *self.extra_args]
            env = self._environment(bundled)
        self.command = command
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=2) as reply:
                return reply.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _wait_ready(self) -> None:
        process = self.process
        assert process is not None  # set by start() before it calls this
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServerError(f"tritonserver exited with code {process.returncode} before it was "
                                  f"ready; log {self.log_path}:\n{self.log_tail()}")
            if self._ready():
                time.sleep(0.2)
                # A stale server on the same port also answers: ours must still be alive.
                if process.poll() is not None:
                    raise ServerError(f"tritonserver exited right after the ready check; log:\n{self.log_tail()}")
                return
            time.sleep(0.25)
        raise ServerError(f"tritonserver not ready after {self.startup_timeout:.0f} s; log {self.log_path}:\n"
                          f"{self.log_tail()}")

    def is_alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, chars: int = 4000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")[-chars:]

    def shm_leftovers(self) -> list[Path]:
        """This server's python-backend shared-memory files still in /dev/shm."""
        return sorted(SHM_DIR.glob(f"{self.shm_prefix}*")) if SHM_DIR.is_dir() else []

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait, SIGKILL if needed; then remove this server's /dev/shm files and temp folder."""
        code = None
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)  # the server and its stubs (own session)
                    self.process.wait(10)
            code = self.process.returncode
        for path in self.shm_leftovers():
            path.unlink(missing_ok=True)
        if self._workdir is not None and self.log_path is not None:
            keep = os.environ.get("KVT_KEEP_TRITON_LOG")
            if keep and self.log_path.exists():
                shutil.copyfile(self.log_path, keep)
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None
        return code

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
