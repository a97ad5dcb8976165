"""Every TensorRT name our code uses exists in the TensorRT 10.13 API (the ``tensorrt-stubs`` .pyi files).

TensorRT itself cannot be installed here, so the engine code cannot run against it; this test is what
keeps a misspelt or removed name from reaching a GPU machine. mypy cannot read the stubs (they contain
syntax errors), so they are parsed with ``ast`` after neutralising the few broken signatures, and our
sources are read with a small, flow-insensitive type inference:

* ``trt`` (a name, a parameter or ``self.trt``) is the ``tensorrt`` module;
* ``trt.X`` must be a module-level name; ``trt.C.M`` must be a member of class C (enum values, nested
  classes, static methods);
* a value made by ``trt.C(...)`` is an instance of C; calling a method or reading a property of a known
  instance gives the stub's return annotation, so ``builder.create_network(...)`` is an
  ``INetworkDefinition`` and ``network.get_input(0)`` an ``ITensor``; variables and ``self.x``
  attributes keep the types of everything assigned to them (per module, iterated to a fixpoint);
* every attribute read on a known instance and every ``getattr``/``hasattr`` with a constant name on
  one is a usage to check.

Names only TensorRT 11.x has must be guarded (``getattr``/``hasattr``) and listed in ``ALLOWED_11X``;
names TensorRT 11 removed are refused even though 10.13 has them (``REMOVED_IN_11X``), except under a
guard. A test feeds deliberately misspelt usages into the checker to show it reports them.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# TensorRT 11.x-only names our code may touch behind a hasattr/getattr guard, as "Class.member"
# (or "module.name"). Empty today: everything the code uses exists in 10.13 and survives in 11.x
# (device_memory_size_v2 instead of device_memory_size; strongly typed networks instead of FP16).
ALLOWED_11X: dict[str, str] = {}

# Removed in TensorRT 11 (NVIDIA's "Migrating from TensorRT 10.x to 11.x", removed Python APIs):
# present in the 10.13 stubs but never to be used unguarded.
REMOVED_IN_11X = {
    "BuilderFlag.FP16", "BuilderFlag.BF16", "BuilderFlag.INT8", "BuilderFlag.FP8", "BuilderFlag.INT4",
    "BuilderFlag.FP4", "BuilderFlag.OBEY_PRECISION_CONSTRAINTS", "BuilderFlag.PREFER_PRECISION_CONSTRAINTS",
    "BuilderFlag.DIRECT_IO", "ICudaEngine.device_memory_size", "IBuilderConfig.int8_calibrator",
    "IBuilderConfig.set_calibration_profile", "IBuilderConfig.get_calibration_profile",
    "IBuilderConfig.set_quantization_flag", "IBuilderConfig.get_quantization_flag",
    "IBuilderConfig.quantization_flags", "IBuilderConfig.clear_quantization_flag",
    "Builder.platform_has_fast_fp16", "Builder.platform_has_fast_int8",
}

MODULE = "<module>"

# Return types the stubs leave out (annotated ``-> ...``), from TensorRT's Python API reference.
RETURN_OVERRIDES = {("OnnxParser", "get_error"): "ParserError"}


# ------------------------------------------------------------------------------------- the stubs

def _stub_dir() -> Path | None:
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
    name: str
    bases: list[str] = field(default_factory=list)
    members: dict[str, tuple[str, str | None]] = field(default_factory=dict)  # name -> (kind, type)


class StubIndex:
    """Classes (with nested classes as "Outer.Inner"), their members, and module-level names."""

    def __init__(self, package_dir: Path, module_init: Path | None = None) -> None:
        self.classes: dict[str, StubClass] = {}
        tree = _parse_tolerant((package_dir / "tensorrt.pyi").read_text())
        self.module_names: set[str] = set()
        self._collect(tree.body, prefix="")
        for path in [package_dir / "__init__.pyi"] + ([module_init] if module_init else []):
            if path.is_file():
                self._collect_module_names(_parse_tolerant(path.read_text()))

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
        if name is None:
            return None
        return name if name in self.classes else None


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

    def __init__(self, stubs: StubIndex, env: dict[str, set], file: str, record: bool) -> None:
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

    def _lookup(self, node: ast.expr) -> set | None:
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

    def types(self, node: ast.expr | None) -> set:
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

    def _member_type(self, owner: str, name: str, as_class: bool) -> set:
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

    def _attribute(self, node: ast.Attribute, guarded: bool, name: str | None = None) -> set:
        name = name or node.attr
        base = node.value if name == node.attr else node  # for getattr(obj, "x"), node is obj
        return self._member_of(self.types(base), name, node, guarded)

    def _member_of(self, base_types: set, name: str, node: ast.AST, guarded: bool) -> set:
        out: set = set()
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

    def _call(self, node: ast.Call) -> set:
        func = node.func
        if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr") and len(node.args) >= 2:
            target, attr = node.args[0], node.args[1]
            if isinstance(attr, ast.Constant) and isinstance(attr.value, str):
                result = self._member_of(self.types(target), attr.value, node, guarded=True)
                return result if func.id == "getattr" else set()
            return set()
        out: set = set()
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
    def _bind(self, target: ast.expr, types: set) -> None:
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
        env: dict[str, set] = {}
        for _ in range(10):  # fixpoint of the per-module variable types
            walker = _Inference(stubs, env, file, record=False)
            walker.visit(tree)
            if not walker.changed:
                break
        walker = _Inference(stubs, env, file, record=True)
        walker.visit(tree)
        usages.extend(walker.usages)
    return sorted(set(usages), key=lambda u: (u.file, u.line, u.qualified))


def check_usages(stubs: StubIndex, usages: list[Usage], allowed_11x: dict[str, str] = ALLOWED_11X,
                 removed_11x: set[str] = REMOVED_IN_11X) -> list[str]:
    """Problems: names absent from the stubs (unless an allow-listed, guarded 11.x name) and names
    TensorRT 11 removed used unguarded."""
    problems = []
    for usage in usages:
        where = f"{usage.file}:{usage.line}"
        if usage.owner == MODULE:
            exists = usage.name in stubs.module_names
        else:
            exists = stubs.member(usage.owner, usage.name) is not None
        if not exists:
            if usage.qualified in allowed_11x and usage.guarded:
                continue
            extra = " (allow-listed 11.x name used without a hasattr/getattr guard)" if usage.qualified in allowed_11x else ""
            problems.append(f"{where}: tensorrt {usage.qualified} does not exist in TensorRT 10.13{extra}")
        elif usage.qualified in removed_11x and not usage.guarded:
            problems.append(f"{where}: tensorrt {usage.qualified} was removed in TensorRT 11")
    return problems


def our_sources() -> dict[str, str]:
    """The engine code plus every other file of the repository that imports TensorRT."""
    files = set((REPO / "engines").glob("*.py")) | {REPO / "runtime" / "backends" / "tensorrt_backend.py"}
    for path in REPO.rglob("*.py"):
        if any(part.startswith(".") or part in ("tests", "build") for part in path.relative_to(REPO).parts):
            continue
        text = path.read_text(errors="replace")
        if "import tensorrt" in text or "import_tensorrt(" in text:
            files.add(path)
    return {str(p.relative_to(REPO)): p.read_text() for p in sorted(files) if p.is_file()}


# ------------------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def stubs() -> StubIndex:
    directory = _stub_dir()
    if directory is None:
        pytest.skip("tensorrt-stubs is not installed (`pip install --no-deps tensorrt-stubs==10.13.*`)")
    init = Path(str(directory)).parent / "tensorrt" / "__init__.pyi"
    return StubIndex(directory, init)


def test_stub_index_reads_the_api(stubs):
    assert stubs.member("IExecutionContext", "execute_async_v3") == ("method", "bool")
    assert stubs.member("Builder", "create_network")[1] == "INetworkDefinition"
    assert stubs.member("Logger", "log") is not None  # inherited from ILogger
    assert stubs.member("ILogger.Severity", "ERROR") == ("value", "ILogger.Severity")
    assert "__version__" in stubs.module_names and "Builder" in stubs.module_names


def test_every_tensorrt_name_we_use_exists(stubs):
    usages = collect_usages(stubs, our_sources())
    problems = check_usages(stubs, usages)
    assert not problems, "\n".join(problems)
    used = {u.qualified for u in usages}
    # The inference must see the calls that matter; if it lost track of a variable, this fails
    # instead of passing vacuously.
    expected = {
        "Builder", "Logger" if "Logger" in used else "ILogger", "OnnxParser", "Runtime",
        "NetworkDefinitionCreationFlag.STRONGLY_TYPED", "Builder.create_network",
        "Builder.create_builder_config", "Builder.create_optimization_profile",
        "Builder.build_serialized_network", "OnnxParser.parse_from_file", "OnnxParser.num_errors",
        "OnnxParser.get_error", "ParserError.node_name", "ParserError.node_operator", "ParserError.desc",
        "IBuilderConfig.builder_optimization_level", "IBuilderConfig.set_memory_pool_limit",
        "MemoryPoolType.WORKSPACE", "IBuilderConfig.create_timing_cache", "IBuilderConfig.set_timing_cache",
        "IBuilderConfig.get_timing_cache", "ITimingCache.serialize", "IBuilderConfig.add_optimization_profile",
        "IOptimizationProfile.set_shape", "INetworkDefinition.num_inputs", "INetworkDefinition.get_input",
        "Runtime.deserialize_cuda_engine", "ICudaEngine.num_io_tensors", "ICudaEngine.get_tensor_name",
        "ICudaEngine.get_tensor_mode", "ICudaEngine.get_tensor_dtype", "TensorIOMode.INPUT",
        "ICudaEngine.get_tensor_profile_shape", "ICudaEngine.num_optimization_profiles",
        "ICudaEngine.device_memory_size_v2", "ICudaEngine.create_execution_context",
        "ExecutionContextAllocationStrategy.USER_MANAGED", "IExecutionContext.set_optimization_profile_async",
        "IExecutionContext.set_input_shape", "IExecutionContext.get_tensor_shape",
        "IExecutionContext.set_tensor_address", "IExecutionContext.set_device_memory",
        "IExecutionContext.execute_async_v3", "DataType.FLOAT", "DataType.HALF", "DataType.BOOL",
        "ILogger.Severity", "__version__",
    }
    assert expected <= used, f"not seen by the checker: {sorted(expected - used)}"


BROKEN = '''
import tensorrt as trt

def build(logger):
    builder = trt.Builder(logger)
    network = builder.create_netwrk(0)                      # misspelt method
    config = builder.create_builder_config()
    config.set_flag(trt.BuilderFlag.FP17)                   # misspelt enum value
    config.set_flag(trt.BuilderFlag.FP16)                   # removed in TensorRT 11
    engine = trt.Runtime(logger).deserialize_cuda_engine(b"")
    size = engine.device_memory_size                        # removed in TensorRT 11
    context = engine.create_execution_context()
    context.execute_async_v4(0)                             # does not exist
    trt.OnnxParsr(network, logger)                          # misspelt class
    if hasattr(context, "set_future_thing"):                # guarded, allow-listed 11.x name
        context.set_future_thing()
    ok = context.set_input_shape("x", (1,))                 # fine
'''


def test_checker_reports_misspelt_and_removed_names(stubs):
    usages = collect_usages(stubs, {"broken.py": BROKEN})
    problems = check_usages(stubs, usages, allowed_11x={"IExecutionContext.set_future_thing": "test"})
    text = "\n".join(problems)
    for name in ("Builder.create_netwrk", "BuilderFlag.FP17", "IExecutionContext.execute_async_v4",
                 "OnnxParsr"):
        assert f"tensorrt {name} does not exist" in text, text
    for name in ("BuilderFlag.FP16", "ICudaEngine.device_memory_size"):
        assert f"tensorrt {name} was removed in TensorRT 11" in text, text
    # the guarded hasattr is allowed; the unguarded call of the same name is not
    assert sum("set_future_thing" in p for p in problems) == 1
    assert "allow-listed 11.x name used without a hasattr/getattr guard" in text
    assert not any("set_input_shape" in p for p in problems)
    assert len(problems) == 7, text
