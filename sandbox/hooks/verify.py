"""The verifier, root-owned in every trainer image; run by the runner in a fresh container of the
experiment's image (no network, read-only, no train.py code): it evaluates the exported program
with the repo's own evaluation function, probes causality and (for models that return a loss)
normalisation, evaluates again on the held-out data when there is some, then prints one
`VERIFY {json}` line.

    python -I /opt/autoresearch-hooks/verify.py /verify

Arguments of the evaluation call that are not plain data (autoresearch's tokenizer) are never
taken from the run: they are rebuilt from the evaluation module itself, by the recipe runner.yaml
gives (`verify_args`, e.g. `tokenizer: Tokenizer.from_directory()`), else by the argument's class
when the module defines it and it can be made without arguments (its constructor, or its one
classmethod that needs none).
"""

import ast
import importlib
import inspect
import json
import math
import os
import subprocess
import sys

HELDOUT_ENV = "AUTORESEARCH_HELDOUT_DIR"    # the held-out data, laid out like the data cache
DATA_SUFFIX = "/.cache/autoresearch"         # where the evaluation code looks under $HOME
MASS_TOLERANCE = 1e-2                        # implied probabilities may sum to at most 1 + this


class Unverifiable(Exception):
    """The call cannot be replayed with trusted inputs: the run is unverified."""


def _evaluation():
    module_name, _, func = os.environ["AUTORESEARCH_VERIFY_TARGET"].rpartition(".")
    module = importlib.import_module(module_name)
    return module, getattr(module, func)


def _attribute(module, dotted: str):
    target = module
    for part in dotted.split("."):
        if not part.isidentifier() or part.startswith("_"):
            raise Unverifiable(f"{dotted!r} is not a public name of {module.__name__}")
        target = getattr(target, part)
    return target


def _recipe(expression: str, module):
    """`Name.attr(arg, key=arg)` or an arg, evaluated against the evaluation module; an arg is a
    literal or a public name of the module (TOKENIZER_DIR). Nothing else is evaluated."""

    def value(node):
        if isinstance(node, (ast.Name, ast.Attribute)):
            return _attribute(module, ast.unparse(node))
        return ast.literal_eval(node)

    node = ast.parse(expression, mode="eval").body
    if not isinstance(node, ast.Call):
        return value(node)
    return _attribute(module, ast.unparse(node.func))(*map(value, node.args), **{k.arg: value(k.value) for k in node.keywords})


def _needs_no_arguments(function) -> bool:
    try:
        parameters = inspect.signature(function).parameters.values()
    except (TypeError, ValueError):
        return False
    return all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in parameters)


def _rebuild(value, name: str, module, recipes: dict):
    import torch

    if name in recipes:
        return _recipe(recipes[name], module)
    if isinstance(value, dict) and "device" in value:
        return torch.device(value["device"])
    if not (isinstance(value, dict) and "object" in value):
        return value
    kind = str(value["object"])
    hint = (f"the evaluation argument {name or '#?'} (a {kind}) cannot be rebuilt from {module.__name__}: "
            f"say how in runner.yaml, e.g. verify_args: {{{name or 'name'}: \"Tokenizer.from_directory()\"}}")
    prefix = module.__name__ + "."
    if not kind.startswith(prefix):
        raise Unverifiable(hint)
    cls = _attribute(module, kind[len(prefix):])
    makers = [cls] if _needs_no_arguments(cls) else [
        getattr(cls, n) for n, v in vars(cls).items() if isinstance(v, classmethod) and _needs_no_arguments(getattr(cls, n))]
    if len(makers) != 1:
        raise Unverifiable(hint)
    made = makers[0]()
    if not isinstance(made, cls):
        raise Unverifiable(hint)
    return made


def _arguments(call: dict, module):
    recipes = json.loads(os.environ.get("AUTORESEARCH_VERIFY_ARGS") or "{}")
    names = call.get("names") or [""] * len(call["args"])
    args = [_rebuild(v, n, module, recipes) for v, n in zip(call["args"], names)]
    kwargs = {k: _rebuild(v, k, module, recipes) for k, v in call["kwargs"].items()}
    return args, kwargs


def _exported(program):
    import torch

    class Exported(torch.nn.Module):
        """What the evaluation function gets: the exported forward, nothing of train.py. It notes
        the largest token id it is shown (inputs and targets), for the normalisation probe."""

        def __init__(self):
            super().__init__()
            self.program = program
            self.largest_id = -1

        def forward(self, *args, **kwargs):
            for a in args:
                if isinstance(a, torch.Tensor) and a.numel() and not a.is_floating_point():
                    self.largest_id = max(self.largest_id, int(a.max()))
            return self.program(*args, **kwargs)

        def train(self, mode=True):  # the exported graph has no modes to switch
            return self

    return Exported()


def _per_position(out, x):
    """The output as (batch, time, k): k = vocabulary for logits, 1 for a loss per position."""
    import torch

    if isinstance(out, (tuple, list)):
        out = next((o for o in out if isinstance(o, torch.Tensor)), None)
    if not isinstance(out, torch.Tensor) or out.numel() == 0 or out.numel() % x.numel():
        return None
    return out.reshape(x.shape[0], x.shape[1], -1)


def _causal(program, inputs, kwargs):
    """Outputs at positions <= t must not change when the inputs (and targets) after t change."""
    import torch

    x = inputs[0] if inputs else None
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] < 4:
        return None
    t = x.shape[1] // 2

    def perturbed(a):
        if not isinstance(a, torch.Tensor) or a.shape[:2] != x.shape[:2]:
            return a
        changed = a.clone()
        tail = a[:, t + 1:]
        # floats flip sign; ids are permuted among themselves, so they stay in the vocabulary
        changed[:, t + 1:] = -tail if a.is_floating_point() else torch.roll(tail.flip(1), 1, 1)
        return changed

    with torch.no_grad():
        first = _per_position(program(*inputs, **kwargs), x)
        second = _per_position(program(*map(perturbed, inputs), **kwargs), x)
    if first is None or second is None:
        return None
    return bool(torch.allclose(first[:, : t + 1].float(), second[:, : t + 1].float(), rtol=1e-3, atol=1e-4))


def _normalised(program, inputs, kwargs, vocab: int, batch: int):
    """For a model that returns a loss per position given targets (autoresearch's model(x, y)):
    exp(-loss) is the probability it gives each target, and summed over every target the
    evaluation showed it those can be at most 1. One row per target value, every position at once
    (targets shifted by a random offset per position). Returns (ok, largest sum) or (None, None)
    where the model returns logits (the evaluation normalises those itself)."""
    import torch

    x = inputs[0] if inputs else None
    if not isinstance(x, torch.Tensor) or x.dim() != 2 or vocab < 2:
        return None, None
    target = next((i for i, a in enumerate(inputs[1:], 1) if isinstance(a, torch.Tensor)
                   and a.shape == x.shape and not a.is_floating_point()), None)
    if target is None:
        return None, None
    with torch.no_grad():
        shaped = _per_position(program(*inputs, **kwargs), x)
        if shaped is None or shaped.shape[-1] != 1:
            return None, None
        steps = x.shape[1]
        shift = torch.randint(0, vocab, (steps,), generator=torch.Generator().manual_seed(0)).to(x.device, x.dtype)
        mass = torch.zeros(steps, dtype=torch.float64, device=x.device)
        for start in range(0, vocab, max(1, batch)):
            rows = torch.arange(start, min(vocab, start + max(1, batch)), device=x.device, dtype=x.dtype)
            n = len(rows)
            call = [a[:1].expand(n, *a.shape[1:]).contiguous() if isinstance(a, torch.Tensor) and a.shape[:1] == x.shape[:1]
                    else a for a in inputs]
            call[target] = (rows[:, None] + shift[None, :]) % vocab
            loss = _per_position(program(*call, **kwargs), call[0]).reshape(n, steps).double()
            mass += torch.exp(-loss).sum(0)
    largest = float(mass.max())
    return bool(largest <= 1 + MASS_TOLERANCE), largest


def _autocast(call: dict):
    """The run's autocast around its evaluation, replayed (only these devices and dtypes)."""
    import contextlib

    import torch

    stack = contextlib.ExitStack()
    for entry in call.get("autocast") or []:
        device, dtype = entry.get("device"), entry.get("dtype")
        if device in ("cuda", "cpu") and dtype in ("bfloat16", "float16", "float32"):
            stack.enter_context(torch.autocast(device_type=device, dtype=getattr(torch, dtype)))
    return stack


def _load(folder: str):
    import torch

    with open(os.path.join(folder, "call.json")) as f:
        call = json.load(f)
    return call, torch.export.load(os.path.join(folder, "model.pt2")).module()


def evaluate(folder: str):
    """The repo's own evaluation of the exported program: (val_bpb, the model wrapper)."""
    sys.path.insert(0, os.getcwd())  # the repo (/repo): its fixed evaluation code, never train.py's
    call, program = _load(folder)
    module, function = _evaluation()
    args, kwargs = _arguments(call, module)
    model = _exported(program)
    with _autocast(call):
        return float(function(model, *args, **kwargs)), model, call, program


def _heldout(folder: str) -> tuple[float | None, str | None]:
    """The same evaluation with $HOME/.cache/autoresearch being the held-out copy of the data, in
    a fresh interpreter (the evaluation module reads its paths at import): (bpb, None), or (None,
    why) when it failed, or (None, None) without held-out data. It informs (the val/held-out gap
    in the report); it decides nothing."""
    data = os.environ.get(HELDOUT_ENV, "")
    if not data.endswith(DATA_SUFFIX) or not os.path.isdir(data):
        return None, None
    try:
        if not os.listdir(data):
            return None, None
    except OSError as exc:
        return None, f"the held-out data cannot be read ({exc.strerror}): make it readable by all, like the data cache"
    env = dict(os.environ, HOME=data[: -len(DATA_SUFFIX)])
    done = subprocess.run([sys.executable, "-I", os.path.abspath(__file__), "--heldout", folder],
                          env=env, capture_output=True, text=True)
    line = next((x for x in reversed(done.stdout.splitlines()) if x.startswith("HELDOUT ")), None)
    if line is None:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or [f"exit {done.returncode}"]
        return None, tail[0][:300]
    return float(line.split(" ", 1)[1]), None


def main(folder: str) -> dict:
    import torch

    verified, model, call, program = evaluate(folder)
    out = {"val_bpb": verified, "self_reported": call.get("self_reported"), "causal": None, "normalised": None}
    if not math.isfinite(verified):
        return dict(out, verdict="unverified", why="the evaluation of the exported program gave no finite number")
    probe = torch.load(os.path.join(folder, "probe.pt"), weights_only=True)
    device = next((b.device for b in program.buffers()), None) or next((p.device for p in program.parameters()), torch.device("cpu"))
    inputs = [a.to(device) if isinstance(a, torch.Tensor) else a for a in probe["args"]]
    with _autocast(call):
        out["causal"] = _causal(program, inputs, probe["kwargs"])
        out["normalised"], out["probability_mass"] = _normalised(program, inputs, probe["kwargs"], model.largest_id + 1,
                                                                 int(call.get("batch") or 1))
    out["heldout_bpb"], out["heldout_error"] = _heldout(folder)
    return out


if __name__ == "__main__":
    if sys.argv[1] == "--heldout":
        print(f"HELDOUT {evaluate(sys.argv[2])[0]!r}", flush=True)
        sys.exit(0)
    try:
        result = main(sys.argv[1])
    except Exception as exc:
        why = str(exc) if isinstance(exc, Unverifiable) else f"{type(exc).__name__}: {str(exc)[:300]}"
        result = {"verdict": "unverified", "why": why}
    print("VERIFY " + json.dumps(result), flush=True)
