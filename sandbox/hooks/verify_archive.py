"""The verifier's first look at an export: the archive as a plain zip, then the loaded graph.
Root-owned next to verify.py; standard library only until a graph is checked (that needs torch).

Everything here was written inside train.py's process, so it is hostile input. torch.export.load
unpickles some entries (pickled weights and constants, custom and opaque objects, legacy files,
the sample inputs) and hands symbolic shape expressions to sympy, which evaluates strings: the
archive is checked entry by entry and copied clean before torch reads it. The graph it rebuilds
must then be a pure function: allowed operators only, and nothing written into what outlives a
call (weights, buffers, constants, inputs), so no call can leave state for the next.
"""

import ast
import json
import operator
import os
import re
import sys
import zipfile

ARCHIVE_MAX_BYTES = 8 << 30                  # all entries of the export archive together
JSON_MAX_BYTES = 64 << 20                    # the graph, and each config


class Refused(Exception):
    """The archive or the graph is not one the verifier runs: the run is refused."""


# --- the archive: a plain zip first, torch only on a clean copy -------------------------------

_STATIC_ENTRIES = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}
_SYMBOL = re.compile(r"[a-z]+\d+")
_SYM_FUNCTIONS = {"FloorDiv", "ModularIndexing", "Where", "PythonMod", "Mod", "CleanDiv", "CeilToInt", "FloorToInt",
                  "CeilDiv", "LShift", "RShift", "PowByNatural", "FloatPow", "FloatTrueDiv", "IntTrueDiv", "TruncToFloat",
                  "TruncToInt", "RoundToInt", "RoundDecimal", "ToFloat", "Max", "Min", "Abs", "Eq", "Ne", "Lt", "Le",
                  "Gt", "Ge", "And", "Or", "Not", "Integer", "Float", "Rational", "Symbol", "Add", "Mul", "Pow",
                  "floor", "ceiling", "StrictLessThan", "StrictGreaterThan", "LessThan", "GreaterThan", "Equality", "Unequality"}
_SYM_CONSTANTS = {"oo", "zoo", "nan", "True", "False"}
_SYM_ASSUMPTIONS = {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "zero", "nonzero"}
_EXPR_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp, ast.Call, ast.Name, ast.Constant,
               ast.keyword, ast.operator, ast.unaryop, ast.cmpop, ast.boolop, ast.Load)


def _check_expression(text) -> None:
    """A symbolic shape expression, which torch hands to sympy (and sympy evaluates strings):
    only numbers, shape symbols (s0, u3, Symbol('s0', integer=True)), sympy's functions on them
    and operators; no attribute, subscript, lambda or other name."""
    refused = Refused(f"the graph holds a symbolic expression that is not arithmetic on shapes: {text!r:.80}")
    if not isinstance(text, str) or len(text) > 10_000:
        raise refused
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError):
        raise refused from None
    for node in ast.walk(tree):
        if not isinstance(node, _EXPR_NODES):
            raise refused
        if isinstance(node, ast.Name) and node.id not in _SYM_FUNCTIONS | _SYM_CONSTANTS and not _SYMBOL.fullmatch(node.id):
            raise refused
        if isinstance(node, ast.Call) and not (isinstance(node.func, ast.Name) and node.func.id in _SYM_FUNCTIONS):
            raise refused
        if isinstance(node, ast.keyword) and (node.arg not in _SYM_ASSUMPTIONS or not isinstance(node.value, ast.Constant)
                                              or not isinstance(node.value.value, bool)):
            raise refused
        if isinstance(node, ast.Constant) and not (isinstance(node.value, (bool, int, float))
                                                    or isinstance(node.value, str) and _SYMBOL.fullmatch(node.value)):
            raise refused


def _check_graph_json(node) -> None:
    stack = [node]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, value in item.items():
                if key == "expr_str":
                    _check_expression(value)
                elif key in ("custom_obj_values", "as_custom_obj", "as_custom_objs") and value:
                    raise Refused("the graph carries custom (pickled) objects")
                elif key == "target" and isinstance(value, str) and not value.startswith(("torch.", "_operator.", "math.")):
                    raise Refused(f"the graph calls {value!r:.80}, which is not a torch, operator or math function")
                stack.append(value)
        elif isinstance(item, list):
            stack.extend(item)


def _check_payload_config(data: bytes, prefix: str) -> set[str]:
    """A weights/constants config: every payload a raw tensor file (no pickle, no objects).
    Returns the payload file names it uses."""
    config = json.loads(data)
    names = set()
    for fqn, meta in (config.get("config") or {}).items():
        path = meta.get("path_name", "")
        if meta.get("use_pickle") or not re.fullmatch(prefix + r"\d+", path or ""):
            raise Refused(f"the archive stores {fqn!r:.60} as {path!r:.40}: only raw tensors are loaded, never pickles or objects")
        names.add(path)
    return names


def sanitised_archive(path: str, workdir: str) -> str:
    """A copy of the export archive at `path` holding only what torch needs to rebuild the graph
    and its tensors, each entry checked; the pickled sample inputs are left out.

    Raises:
        Refused: anything else is in it, or it is compressed, too big, or not a zip.
    """
    import stat

    info = os.lstat(path)
    if not stat.S_ISREG(info.st_mode):
        raise Refused("the exported model is not a regular file")
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise Refused(f"the exported model is not a torch.export archive ({exc})") from None
    with archive:
        entries = archive.infolist()
        roots = {e.filename.split("/", 1)[0] for e in entries}
        if len(roots) != 1 or len(entries) > 100_000:
            raise Refused("the export archive is not one torch.export package")
        root = roots.pop() + "/"
        total = 0
        by_name = {}
        for e in entries:
            name = e.filename[len(root):]
            if e.compress_type != zipfile.ZIP_STORED or e.flag_bits & 0x1:
                raise Refused(f"the export archive compresses or encrypts {name!r:.60}; torch.export stores entries plain")
            total += e.file_size
            if total > ARCHIVE_MAX_BYTES:
                raise Refused("the export archive is larger than the verifier loads")
            by_name[name] = e
        models = [n for n in by_name if re.fullmatch(r"models/\w+\.json", n)]
        if len(models) != 1:
            raise Refused("the export archive must hold exactly one model")
        model = models[0][len("models/"):-len(".json")]

        def read(name: str, limit: int | None = None) -> bytes:
            if name not in by_name:
                raise Refused(f"the export archive lacks {name}")
            if limit is not None and by_name[name].file_size > limit:
                raise Refused(f"{name} in the export archive is too large")
            return archive.read(by_name[name])

        if read("archive_format", 16).strip() != b"pt2" or read("byteorder", 16).strip() != sys.byteorder.encode():
            raise Refused("the export archive is not a pt2 archive of this byte order")
        graph = read(models[0], JSON_MAX_BYTES)
        try:
            _check_graph_json(json.loads(graph))
            weights_config = f"data/weights/{model}_weights_config.json"
            constants_config = f"data/constants/{model}_constants_config.json"
            wanted = {n: read(n, JSON_MAX_BYTES) for n in (weights_config, constants_config)}
            payloads = {f"data/weights/{p}" for p in _check_payload_config(wanted[weights_config], "weight_")}
            payloads |= {f"data/constants/{p}" for p in _check_payload_config(wanted[constants_config], "tensor_")}
        except (ValueError, AttributeError, TypeError) as exc:
            raise Refused(f"the export archive's configuration does not parse ({exc})") from None
        allowed = _STATIC_ENTRIES | {models[0], f"data/sample_inputs/{model}.pt"} | set(wanted) | payloads
        extra = sorted(set(by_name) - allowed)
        if extra:
            raise Refused(f"the export archive holds entries torch.export does not write for a model: {extra[0]!r:.80}")
        clean = os.path.join(workdir, "model.pt2")
        with zipfile.ZipFile(clean, "w", zipfile.ZIP_STORED) as out:
            for name in sorted(allowed - {f"data/sample_inputs/{model}.pt"}):
                if name in by_name:
                    with archive.open(by_name[name]) as src, out.open(root + name, "w", force_zip64=True) as dst:
                        while chunk := src.read(1 << 20):
                            dst.write(chunk)
            out.writestr(root + f"data/sample_inputs/{model}.pt", b"")  # no example inputs: they are a pickle
    return clean


# --- the graph: a pure function of its inputs ---------------------------------------------------

_PURE_HOPS = {"wrap_with_set_grad_enabled", "wrap_with_autocast"}   # their bodies are checked like the graph
_OPERATOR_MODULES = {"_operator", "operator", "math"}
_DENIED_ATEN = {"_print", "_assert_async", "_functional_assert_async", "set_", "record_stream", "_cudnn_rnn_flatten_weight"}
_SIDE_EFFECT_SPECS = {"TOKEN", "CUSTOM_OBJ"}


def _check_target(target, namespaces: set[str]) -> None:
    import torch

    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
        if namespace == "aten":
            if target.__name__.split(".")[0] in _DENIED_ATEN:
                raise Refused(f"the graph calls aten.{target.__name__}, which is not a pure tensor operation")
            return
        if namespace in namespaces:
            return
        raise Refused(f"the graph calls {namespace}.{target.__name__}: allow the namespace in runner.yaml "
                      f"(verify_ops: [{namespace}]) if it is the repo's own kernel")
    if isinstance(target, torch._ops.HigherOrderOperator):
        if target.name() in _PURE_HOPS:
            return
        raise Refused(f"the graph uses {target.name()}: control flow and other higher-order operators are not verified")
    module = getattr(target, "__module__", None)
    if module in _OPERATOR_MODULES and callable(target):
        return
    name = getattr(target, "__name__", "")
    if name.startswith("sym_") and getattr(torch, name, None) is target:
        return
    raise Refused(f"the graph calls {module}.{name or target!r:.60}, which is not a tensor operation")


def _writes_and_views(node):
    """(the arguments `node` writes into, the arguments its result is a view of), by its schema."""
    import torch

    target = node.target
    if not isinstance(target, torch._ops.OpOverload):
        return [], []
    writes, views = [], []
    for i, arg in enumerate(target._schema.arguments):
        value = node.args[i] if i < len(node.args) else node.kwargs.get(arg.name)
        info = arg.alias_info
        if info is None or value is None:
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        (writes if info.is_write else views).extend(v for v in values if hasattr(v, "op"))
    return writes, views


def check_fake_run(program) -> None:
    """Runs the graph once on fake tensors (shapes only, nothing computed). Every operator must
    have a fake implementation in this clean process: an operator that reads or writes files or
    devices (aten.from_file) has none, and could only be exported because train.py registered
    one in its own process. Call it under the evaluation's autocast (its dtype checks hold there).

    Raises:
        Refused: an operator cannot run on fake tensors here.
    """
    from torch._guards import detect_fake_mode
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    inputs = [node.meta.get("val") for node in program.graph_module.graph.nodes if node.op == "placeholder"]
    try:
        FakeTensorProp(program.graph_module, detect_fake_mode(inputs)).propagate_dont_convert_inputs(*inputs)
    except Exception as exc:  # torch raises several kinds here; any is a graph we do not run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise Refused(f"the graph does not run on fake tensors in a clean process ({first[:200]})") from None


def check_program(program, namespaces: set[str]) -> None:
    """Raises Refused unless `program` (an ExportedProgram) is a pure function of its inputs:
    allowed operators only, and nothing written into its weights, buffers, constants or inputs
    (directly or through a view), so no call can leave state for the next one. Writes into
    tensors a call made itself (x[:, -1] = 0) are pure."""
    signature = program.graph_signature
    for spec in list(signature.input_specs) + list(signature.output_specs):
        kind = spec.kind.name
        if kind in _SIDE_EFFECT_SPECS or "MUTATION" in kind or kind.startswith(("GRADIENT", "LOSS")):
            raise Refused(f"the exported program has a {kind.lower().replace('_', ' ')}: state or side effects across calls")
    for module in program.graph_module.modules():
        graph = getattr(module, "graph", None)
        held = set()  # placeholders and get_attr tensors, and views of them: what outlives a call
        for node in graph.nodes if graph is not None else ():
            if node.op in ("placeholder", "get_attr"):
                held.add(node)
                continue
            if node.op == "output":
                continue
            if node.op != "call_function":
                raise Refused(f"the graph has a {node.op} node")
            _check_target(node.target, namespaces)
            writes, views = _writes_and_views(node)
            if any(w in held for w in writes):
                raise Refused(f"the graph writes into its weights, buffers or inputs ({node.target}): state across calls")
            if any(v in held for v in views) or node.target is operator.getitem and node.args and node.args[0] in held:
                held.add(node)
