"""Static check: every TensorRT name kvt uses exists in the TensorRT API of the oldest supported version
and of the newest one stubs exist for (the ``tensorrt-stubs`` .pyi files of each).

TensorRT itself often cannot be installed where kvt is developed, so the engine code cannot run against
it; this check keeps a misspelt or removed name from reaching a GPU machine. mypy cannot read the stubs
(they contain syntax errors), so they are parsed with ``ast`` after neutralising the few broken
signatures, and kvt's sources are read with a small, flow-insensitive type inference:

* ``trt`` (a name, a parameter or ``self.trt``) is the ``tensorrt`` module;
* ``trt.X`` must be a module-level name; ``trt.C.M`` must be a member of class C (enum values, nested
  classes, static methods);
* a value made by ``trt.C(...)`` is an instance of C; calling a method or reading a property of a known
  instance gives the stub's return annotation, so ``builder.create_network(...)`` is an
  ``INetworkDefinition`` and ``network.get_input(0)`` an ``ITensor``; variables and ``self.x``
  attributes keep the types of everything assigned to them (per module, iterated to a fixpoint);
* every attribute read on a known instance and every ``getattr``/``hasattr`` with a constant name on
  one is a usage to check.

Names only TensorRT 11.x has must be guarded (``getattr``/``hasattr``) and listed in :data:`ALLOWED_11X`;
names TensorRT 11 removed are refused even though 10.13 has them (:data:`REMOVED_IN_11X`), except under
a guard.

    python -m kvt.engines.api_check [--stubs DIR ...]

checks against every ``--stubs`` folder given (default: the installed stubs), prints one line per
problem and exits 1 when there are any (2 when the stubs cannot be found). CI runs it with the stubs of
:data:`kvt.runtime.backends.tensorrt.trt_env.MIN_TENSORRT_VERSION` (10.12) and of the newest release
(10.13): ``pip install --no-deps --target DIR tensorrt-stubs==10.12.0.36.1``.

:data:`INTRODUCED` records, for every TensorRT name kvt uses, the release that introduced it (read from
NVIDIA/TensorRT's Python bindings, ``python/src``, at the release tags); a test checks that it covers
every usage and that no entry is newer than the minimum version.

The builder names ``tensorrt.DataType`` members through the contract's type table
(``getattr(trt.DataType, dtype.tensorrt)``); those names are checked from the table itself
(:func:`dtype_table_usages`).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kvt.contract.dtypes import DType

# TensorRT 11.x-only names our code may touch behind a hasattr/getattr guard, as "Class.member"
# (or "module.name"). Empty today: everything the code uses exists in 10.13 and survives in 11.x
# (device_memory_size_v2 instead of device_memory_size; strongly typed networks instead of FP16).
ALLOWED_11X: dict[str, str] = {}

# Removed in TensorRT 11 (NVIDIA's "Migrating from TensorRT 10.x to 11.x", removed Python APIs):
# present in the 10.13 stubs but never to be used unguarded.
REMOVED_IN_11X: frozenset[str] = frozenset({
    "BuilderFlag.FP16", "BuilderFlag.BF16", "BuilderFlag.INT8", "BuilderFlag.FP8", "BuilderFlag.INT4",
    "BuilderFlag.FP4", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS",
    "BuilderFlag.DIRECT_IO", "ICudaEngine.device_memory_size", "IBuilderConfig.int8_calibrator",
    "IBuilderConfig.set_calibration_profile", "IBuilderConfig.get_calibration_profile",
    "IBuilderConfig.set_quantization_flag", "IBuilderConfig.get_quantization_flag",
    "IBuilderConfig.quantization_flags", "IBuilderConfig.clear_quantization_flag",
    "Builder.platform_has_fast_fp16", "Builder.platform_has_fast_int8",
})

MODULE = "<module>"

# Every TensorRT name kvt uses -> the first release whose Python bindings have it (NVIDIA/TensorRT
# ``python/src`` at the release tags; "8.6" means 8.6 or earlier, the oldest tag compared). All of them
# are still bound in TensorRT 11.1. docs/TENSORRT.md prints this table.
_SINCE_8_6 = (
    "Builder", "Builder.build_serialized_network", "Builder.create_builder_config", "Builder.create_network",
    "Builder.create_optimization_profile", "DataType", "DataType.BOOL", "DataType.FLOAT", "DataType.HALF",
    "DataType.INT32", "DataType.INT8", "DataType.UINT8", "HardwareCompatibilityLevel",
    "IBuilderConfig.add_optimization_profile", "IBuilderConfig.builder_optimization_level",
    "IBuilderConfig.create_timing_cache", "IBuilderConfig.get_timing_cache",
    "IBuilderConfig.hardware_compatibility_level", "IBuilderConfig.set_memory_pool_limit",
    "IBuilderConfig.set_preview_feature", "IBuilderConfig.set_timing_cache", "ICudaEngine.create_execution_context",
    "ICudaEngine.get_tensor_dtype", "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_name",
    "ICudaEngine.get_tensor_profile_shape", "ICudaEngine.num_io_tensors", "ICudaEngine.num_optimization_profiles",
    "IExecutionContext.execute_async_v3", "IExecutionContext.get_tensor_shape", "IExecutionContext.set_input_shape",
    "IExecutionContext.set_optimization_profile_async", "IExecutionContext.set_tensor_address", "ILogger",
    "ILogger.Severity", "ILogger.Severity.ERROR", "ILogger.Severity.INTERNAL_ERROR", "ILogger.Severity.VERBOSE",
    "ILogger.Severity.WARNING", "INetworkDefinition.get_input", "INetworkDefinition.get_output",
    "INetworkDefinition.num_inputs", "INetworkDefinition.num_outputs", "IOptimizationProfile.set_shape",
    "ITimingCache.serialize", "MemoryPoolType", "MemoryPoolType.WORKSPACE", "NetworkDefinitionCreationFlag",
    "OnnxParser", "OnnxParser.get_error", "OnnxParser.num_errors", "OnnxParser.parse_from_file", "ParserError.code",
    "ParserError.desc", "ParserError.node", "PreviewFeature", "Runtime", "Runtime.deserialize_cuda_engine",
    "TensorIOMode", "TensorIOMode.INPUT", "__version__", "ICudaEngine.create_engine_inspector",
    "EngineInspector.get_engine_information", "LayerInformationFormat", "LayerInformationFormat.JSON",
    "IBuilderConfig.profiling_verbosity", "ProfilingVerbosity", "ProfilingVerbosity.DETAILED",
)
INTRODUCED: dict[str, str] = {
    **{name: "8.6" for name in _SINCE_8_6},
    "DataType.BF16": "9.0", "DataType.INT64": "9.0", "NetworkDefinitionCreationFlag.STRONGLY_TYPED": "9.0",
    "ParserError.node_name": "9.1", "ParserError.node_operator": "9.1",
    "ExecutionContextAllocationStrategy": "10.0", "ExecutionContextAllocationStrategy.USER_MANAGED": "10.0",
    "IExecutionContext.update_device_memory_size_for_shapes": "10.0",
    "ICudaEngine.device_memory_size_v2": "10.1", "IExecutionContext.set_device_memory": "10.1",
    "HardwareCompatibilityLevel.SAME_COMPUTE_CAPABILITY": "10.9",
    "PreviewFeature.RUNTIME_ACTIVATION_RESIZE_10_10": "10.10",
}

# Return types the stubs leave out (annotated ``-> ...``), from TensorRT's Python API reference.
RETURN_OVERRIDES: dict[tuple[str, str], str] = {("OnnxParser", "get_error"): "ParserError"}

# The folders of kvt (relative to the package) whose every file is checked; any other kvt module that
# imports TensorRT is found by its text.
ENGINE_FOLDERS: tuple[str, ...] = ("engines", "runtime/backends/tensorrt")

# A type as the inference sees it: MODULE (the tensorrt module), ("class", C), ("inst", C) or
# ("method", C, name).
Type = object


# ------------------------------------------------------------------------------------- the stubs

def stub_dir() -> Path | None:
    """The installed ``tensorrt_bindings`` stub folder (from ``tensorrt-stubs``), or None."""
    spec = importlib.util.find_spec("tensorrt_bindings")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0])
    return path if (path / "tensorrt.pyi").is_file() else None


def _parse_tolerant(text: str) -> ast.Module:
    """Parse a .pyi whose signatures may be invalid Python (parameters named ``in``, defaults before
    non-defaults): each offending ``def`` line becomes ``def name(*args, **kwargs):``."""
    lines = text.split("\n")
    for _ in range(200):
        try:
            return ast.parse("\n".join(lines))
        except SyntaxError as exc:
            index = (exc.lineno or 1) - 1
            match = re.match(r"^(\s*)def (\w+)\(", lines[index])
            if not match:
                raise
            lines[index] = f"{match.group(1)}def {match.group(2)}(*args, **kwargs):"
    raise RuntimeError("too many syntax errors in the stubs")


def _simple_type(node: ast.expr | None) -> str | None:
    """'ICudaEngine' from an annotation ``ICudaEngine`` / ``ILogger.Severity`` / ``typing.ClassVar[X]``."""
    if node is None:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        try:
            return _simple_type(ast.parse(node.value, mode="eval").body)
        except SyntaxError:
            return None
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        inner = _simple_type(node.value)
        return f"{inner}.{node.attr}" if inner and inner not in ("typing", "tensorrt") else node.attr
    if isinstance(node, ast.Subscript) and _simple_type(node.value) in ("ClassVar", "typing.ClassVar"):
        return _simple_type(node.slice)
    return None


@dataclass
class StubClass:
    """One class of the stubs: its bases and members (name -> (kind, type))."""

    name: str
    bases: list[str] = field(default_factory=list)
    members: dict[str, tuple[str, str | None]] = field(default_factory=dict)


class StubIndex:
    """Classes (with nested classes as "Outer.Inner"), their members, and module-level names."""

    def __init__(self, package_dir: Path, module_init: Path | None = None) -> None:
        self.classes: dict[str, StubClass] = {}
        tree = _parse_tolerant((package_dir / "tensorrt.pyi").read_text())
        self.module_names: set[str] = set()
        self.version = "unknown"  # the stubs' tensorrt.__version__
        self._collect(tree.body, prefix="")
        for path in [package_dir / "__init__.pyi"] + ([module_init] if module_init else []):
            if path.is_file():
                module = _parse_tolerant(path.read_text())
                self._collect_module_names(module)
                self.version = _version_of(module) or self.version

    @classmethod
    def load(cls, package_dir: Path | None = None) -> StubIndex | None:
        """The index of ``package_dir`` (default: the installed stubs) with the ``tensorrt`` package's
        ``__init__.pyi`` beside it; None when no stubs are found."""
        directory = package_dir or stub_dir()
        if directory is None or not (directory / "tensorrt.pyi").is_file():
            return None
        return cls(directory, directory.parent / "tensorrt" / "__init__.pyi")

    def _collect(self, body: list[ast.stmt], prefix: str) -> None:
        for node in body:
            if isinstance(node, ast.ClassDef):
                self._class(node, prefix)
            elif isinstance(node, (ast.FunctionDef, ast.AnnAssign, ast.Assign)) and not prefix:
                self.module_names.update(_defined_names(node))

    def _class(self, node: ast.ClassDef, prefix: str) -> None:
        name = f"{prefix}{node.name}"
        cls = StubClass(name, [b for b in (_simple_type(b) for b in node.bases) if b])
        for item in node.body:
            if isinstance(item, ast.FunctionDef):
                is_property = any(_simple_type(d) == "property" for d in item.decorator_list)
                kind = "property" if is_property else "method"
                cls.members.setdefault(item.name, (kind, _simple_type(item.returns)))
            elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                cls.members[item.target.id] = ("value", _simple_type(item.annotation))
            elif isinstance(item, ast.ClassDef):
                cls.members[item.name] = ("class", f"{name}.{item.name}")
                self._class(item, f"{name}.")
        self.classes[name] = cls
        if not prefix:
            self.module_names.add(name)

    def _collect_module_names(self, tree: ast.Module) -> None:
        for node in tree.body:
            if isinstance(node, ast.ImportFrom):
                self.module_names.update(a.asname or a.name for a in node.names)
            elif isinstance(node, ast.Import):
                self.module_names.update((a.asname or a.name).split(".")[0] for a in node.names)
            else:
                self.module_names.update(_defined_names(node))

    def member(self, cls: str, name: str) -> tuple[str, str | None] | None:
        """(kind, type) of member ``name`` of class ``cls`` or of one of its bases; None if absent."""
        seen: set[str] = set()
        todo = [cls]
        while todo:
            current = todo.pop()
            if current in seen or current not in self.classes:
                continue
            seen.add(current)
            info = self.classes[current]
            if name in info.members:
                return info.members[name]
            todo.extend(info.bases)
        return None

    def resolve_type(self, name: str | None) -> str | None:
        """``name`` if it is a class of the stubs, else None."""
        if name is None:
            return None
        return name if name in self.classes else None


def _version_of(module: ast.Module) -> str | None:
    """``__version__: str = '10.13.0.35'`` of a stub module."""
    for node in module.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) and node.targets else None)
        value = getattr(node, "value", None)
        if (isinstance(target, ast.Name) and target.id == "__version__" and isinstance(value, ast.Constant)
                and isinstance(value.value, str)):
            return value.value
    return None


def _defined_names(node: ast.stmt) -> set[str]:
    if isinstance(node, ast.FunctionDef):
        return {node.name}
    if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
        return {node.target.id}
    if isinstance(node, ast.Assign):
        return {t.id for t in node.targets if isinstance(t, ast.Name)}
    return set()


# ------------------------------------------------------------------------------------- our code

@dataclass(frozen=True)
class Usage:
    """One TensorRT name used in a source file."""

    owner: str  # a class name, or MODULE
    name: str
    file: str
    line: int
    guarded: bool  # inside getattr/hasattr with a constant name

    @property
    def qualified(self) -> str:
        return self.name if self.owner == MODULE else f"{self.owner}.{self.name}"


class _Inference(ast.NodeVisitor):
    """Types of expressions: MODULE, ("class", C) for class objects, ("inst", C) for instances."""

    def __init__(self, stubs: StubIndex, env: dict[str, set[Type]], file: str, record: bool) -> None:
        self.stubs, self.env, self.file, self.record = stubs, env, file, record
        self.usages: list[Usage] = []
        self.changed = False
        self.scopes: list[tuple[str, set[str]]] = [("", set())]  # (function qualname, its parameters)

    # scopes: a local's type is per function; a parameter without a local binding takes the types its
    # name has anywhere in the module (where the caller made the value); self.x is per module.
    def _key(self, node: ast.expr) -> str | None:
        if isinstance(node, ast.Name):
            return f"fn:{self.scopes[-1][0]}:{node.id}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
            return f"self.{node.attr}"
        return None

    def _lookup(self, node: ast.expr) -> set[Type] | None:
        key = self._key(node)
        if key is None:
            return None
        if key in self.env:
            return self.env[key]
        if isinstance(node, ast.Name) and node.id in self.scopes[-1][1]:
            return self.env.get(f"mod:{node.id}")
        return None

    def visit_FunctionDef(self, node: ast.FunctionDef | ast.AsyncFunctionDef) -> None:
        args = node.args
        params = {a.arg for a in args.posonlyargs + args.args + args.kwonlyargs}
        params |= {a.arg for a in (args.vararg, args.kwarg) if a is not None}
        self.scopes.append((f"{self.scopes[-1][0]}.{node.name}", params))
        self.generic_visit(node)
        self.scopes.pop()

    visit_AsyncFunctionDef = visit_FunctionDef

    def types(self, node: ast.expr | None) -> set[Type]:
        if node is None:
            return set()
        if isinstance(node, ast.Name) and node.id in ("trt", "tensorrt"):
            return {MODULE}
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
                and node.attr in ("trt", "_trt")):
            return {MODULE}
        known = self._lookup(node)
        if known is not None:
            return set(known)
        if isinstance(node, ast.BoolOp):
            return set().union(*(self.types(v) for v in node.values))
        if isinstance(node, ast.IfExp):
            return self.types(node.body) | self.types(node.orelse)
        if isinstance(node, ast.Attribute):
            return self._attribute(node, guarded=False)
        if isinstance(node, ast.Call):
            return self._call(node)
        if isinstance(node, ast.Await):
            return self.types(node.value)
        return set()

    def _use(self, owner: str, name: str, node: ast.AST, guarded: bool) -> None:
        if self.record:
            self.usages.append(Usage(owner, name, self.file, getattr(node, "lineno", 0), guarded))

    def _member_type(self, owner: str, name: str, as_class: bool) -> set[Type]:
        info = self.stubs.member(owner, name)
        if info is None:
            return set()
        kind, typ = info
        if kind == "class":
            return {("class", typ)}
        if kind == "value" and typ and self.stubs.resolve_type(typ):
            return {("inst", typ)}
        if kind == "property" and not as_class and self.stubs.resolve_type(typ):
            return {("inst", typ)}
        if kind == "method":
            return {("method", owner, name)}
        return set()

    def _attribute(self, node: ast.Attribute, guarded: bool) -> set[Type]:
        return self._member_of(self.types(node.value), node.attr, node, guarded)

    def _member_of(self, base_types: set[Type], name: str, node: ast.AST, guarded: bool) -> set[Type]:
        out: set[Type] = set()
        for t in base_types:
            if t == MODULE:
                if name.startswith("__") and name.endswith("__") and name != "__version__":
                    continue  # module dunders (__path__, __file__) are Python's, not TensorRT's
                self._use(MODULE, name, node, guarded)
                if name in self.stubs.classes:
                    out.add(("class", name))
            elif isinstance(t, tuple) and t[0] in ("class", "inst"):
                if name.startswith("__") and name.endswith("__"):
                    continue  # dunders: object protocol, not API names
                self._use(t[1], name, node, guarded)
                out |= self._member_type(t[1], name, as_class=t[0] == "class")
        return out

    def _call(self, node: ast.Call) -> set[Type]:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr") and len(node.args) >= 2:
            target, attr = node.args[0], node.args[1]
            if isinstance(attr, ast.Constant) and isinstance(attr.value, str):
                result = self._member_of(self.types(target), attr.value, node, guarded=True)
                return result if func.id == "getattr" else set()
            return set()
        out: set[Type] = set()
        for t in self.types(func):
            if isinstance(t, tuple) and t[0] == "class":
                out.add(("inst", t[1]))
            elif isinstance(t, tuple) and t[0] == "method":
                info = self.stubs.member(t[1], t[2])
                typ = RETURN_OVERRIDES.get((t[1], t[2])) or (info[1] if info else None)
                if self.stubs.resolve_type(typ):
                    out.add(("inst", typ))
        return out

    # statements -----------------------------------------------------------
    def _bind(self, target: ast.expr, types: set[Type]) -> None:
        key = self._key(target)
        if key is None or not types or key in ("self.trt", "self._trt") or key.endswith(":trt"):
            return
        keys = [key] + ([f"mod:{target.id}"] if isinstance(target, ast.Name) else [])
        for k in keys:
            current = self.env.setdefault(k, set())
            if not types <= current:
                current |= types
                self.changed = True

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            if (isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                    and len(target.elts) == len(node.value.elts)):
                for part, value in zip(target.elts, node.value.elts):
                    self._bind(part, self.types(value))
            else:
                self._bind(target, self.types(node.value))
        self.generic_visit(node)

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        if node.value is not None:
            self._bind(node.target, self.types(node.value))
        self.generic_visit(node)

    def visit_Attribute(self, node: ast.Attribute) -> None:
        self._attribute(node, guarded=False)
        self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr"):
            self._call(node)
        self.generic_visit(node)


def collect_usages(stubs: StubIndex, sources: dict[str, str]) -> list[Usage]:
    """Every TensorRT name used in ``sources`` (file name -> text)."""
    usages: list[Usage] = []
    for file, text in sources.items():
        tree = ast.parse(text)
        env: dict[str, set[Type]] = {}
        for _ in range(10):  # fixpoint of the per-module variable types
            walker = _Inference(stubs, env, file, record=False)
            walker.visit(tree)
            if not walker.changed:
                break
        walker = _Inference(stubs, env, file, record=True)
        walker.visit(tree)
        usages.extend(walker.usages)
    return sorted(set(usages), key=lambda u: (u.file, u.line, u.qualified))


def check_usages(stubs: StubIndex, usages: Sequence[Usage], allowed_11x: dict[str, str] | None = None,
                 removed_11x: frozenset[str] | set[str] = REMOVED_IN_11X) -> list[str]:
    """Problems, one line each: names absent from the stubs (unless an allow-listed 11.x name used
    under a guard) and names TensorRT 11 removed used unguarded."""
    allowed = ALLOWED_11X if allowed_11x is None else allowed_11x
    problems = []
    for usage in usages:
        where = f"{usage.file}:{usage.line}"
        if usage.owner == MODULE:
            exists = usage.name in stubs.module_names
        else:
            exists = stubs.member(usage.owner, usage.name) is not None
        if not exists:
            if usage.qualified in allowed and usage.guarded:
                continue
            extra = (" (allow-listed 11.x name used without a hasattr/getattr guard)"
                     if usage.qualified in allowed else "")
            problems.append(f"{where}: tensorrt {usage.qualified} does not exist in TensorRT {stubs.version}{extra}")
        elif usage.qualified in removed_11x and not usage.guarded:
            problems.append(f"{where}: tensorrt {usage.qualified} was removed in TensorRT 11")
    return problems


def _package_dir() -> Path:
    return Path(__file__).resolve().parents[1]  # src/kvt (this file is kvt/engines/api_check.py)


def kvt_sources(package_dir: Path | None = None) -> dict[str, str]:
    """The engine code (:data:`ENGINE_FOLDERS`) plus every other kvt module that imports TensorRT,
    as file name (relative to the folder holding ``kvt``, e.g. ``kvt/engines/builder.py``) -> text."""
    package = package_dir or _package_dir()
    files: set[Path] = set()
    for folder in ENGINE_FOLDERS:
        files |= set((package / folder).glob("*.py"))
    uses: Callable[[str], bool] = lambda text: "import tensorrt" in text or "import_tensorrt(" in text
    for path in package.rglob("*.py"):
        if any(part.startswith(".") or part == "__pycache__" for part in path.relative_to(package).parts):
            continue
        if uses(path.read_text(errors="replace")):
            files.add(path)
    return {str(p.relative_to(package.parent)): p.read_text() for p in sorted(files) if p.is_file()}


def dtype_table_usages(package_dir: Path | None = None) -> list[Usage]:
    """The ``tensorrt.DataType`` members named by the stage contract's type table.

    The builder reads them with ``getattr(trt.DataType, dtype.tensorrt)``, which the source inference
    cannot follow, so each name is taken from :class:`kvt.contract.dtypes.DType` and reported at its
    row of ``kvt/contract/dtypes.py``.
    """
    path = (package_dir or _package_dir()) / "contract" / "dtypes.py"
    lines = path.read_text().splitlines() if path.is_file() else []
    file = "/".join(path.parts[-3:])
    usages = []
    for dtype in DType:
        try:
            name = dtype.tensorrt
        except TypeError:  # no TensorRT counterpart (float64, string)
            continue
        row = next((i + 1 for i, line in enumerate(lines) if line.lstrip().startswith(f'"{dtype.value}":')), 0)
        usages.append(Usage("DataType", name, file, row, guarded=False))
    return usages


def check_kvt(stubs: StubIndex, package_dir: Path | None = None) -> tuple[list[Usage], list[str]]:
    """(usages, problems) of kvt's own sources and of its contract's TensorRT type names."""
    usages = collect_usages(stubs, kvt_sources(package_dir)) + dtype_table_usages(package_dir)
    return usages, check_usages(stubs, usages)


def stub_folder(path: Path) -> Path:
    """The ``tensorrt_bindings`` folder of ``path`` (that folder itself, or a ``pip --target`` folder)."""
    return path / "tensorrt_bindings" if (path / "tensorrt_bindings" / "tensorrt.pyi").is_file() else path


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m kvt.engines.api_check``: 0 when every name exists in every stub set, 1 when there are
    problems, 2 when stubs are not found."""
    parser = argparse.ArgumentParser(prog="python -m kvt.engines.api_check",
                                     description="Check every TensorRT name kvt uses against the tensorrt-stubs.")
    parser.add_argument("--stubs", metavar="DIR", type=Path, action="append", default=[],
                        help="a tensorrt_bindings stub folder holding tensorrt.pyi, or a `pip install --target` "
                             "folder of tensorrt-stubs (repeatable; default: the installed tensorrt-stubs)")
    args = parser.parse_args(argv)
    folders: list[Path | None] = [stub_folder(p) for p in args.stubs] or [None]
    failed = False
    for folder in folders:
        stubs = StubIndex.load(folder)
        if stubs is None:
            where = folder or "the installed packages"
            print(f"api_check: no tensorrt.pyi in {where} (`pip install --no-deps tensorrt-stubs==10.13.*`)",
                  file=sys.stderr)
            return 2
        usages, problems = check_kvt(stubs)
        for problem in problems:
            print(problem)
        missing = sorted({u.qualified for u in usages} - set(INTRODUCED))
        for name in missing:
            print(f"api_check: tensorrt {name} is used but INTRODUCED does not say which release added it")
        files = len({u.file for u in usages})
        print(f"api_check: TensorRT {stubs.version}: {len(usages)} TensorRT usages in {files} files, "
              f"{len(problems)} problem(s)", file=sys.stderr)
        failed |= bool(problems or missing)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
