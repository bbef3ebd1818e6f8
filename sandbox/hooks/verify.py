"""The verifier, root-owned in every trainer image; run by the runner in a fresh container of the
experiment's image (no network, read-only, no train.py code):

    python -I /opt/autoresearch-hooks/verify.py /verify

Everything in /verify was written inside train.py's process, so all of it is hostile input:
- the archive and the graph are checked before anything of them runs (verify_archive.py): no
  pickle, no string sympy would evaluate, only pure operators, no writes into what outlives a
  call. After the evaluation and the probes, the program's weights, buffers and constants must
  be what they were before the first call (a write through a view no schema admits to would
  still be state), and every call gets copies of its inputs and freshly seeded generators;
- the evaluation's arguments are bound by the function's own signature: a parameter with a
  default gets its default, a required one what the run passed as plain data, and an object
  (autoresearch's tokenizer) is rebuilt from the evaluation module (`verify_args`, else the
  class's argument-free constructor or its one argument-free classmethod).

The number is the repo's own evaluation function run on the exported program. The probes are
folded into that evaluation: rows of the very batches it scores, drawn with this process's own
randomness, are evaluated again after it in batches of the same shape, each row spliced at a
secret cut with real text from another row and among other companions; its outputs up to the
cut must not change (causality, and no reading of other rows), compared as log-probabilities
in nats. Where the evaluation gives the model targets (autoresearch's model(x, y,
reduction='none') returns a loss per position), the program is the model on the ids alone, and
the loss the evaluation gets is computed here from its logits (log_softmax, the target's entry):
normalised at every position by construction, so a loss the model would state, which could
claim more probability than there is on rows no probe samples, is never summed.

The report is one line carrying the secret the runner made for this verification (removed from
the environment before anything of the run is read), printed only by this file's own code.
"""

import ast
import contextlib
import dataclasses
import importlib
import inspect
import json
import math
import os
import random
import re
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import verify_protocol as protocol  # noqa: E402  (root-owned, next to this file)
from verify_archive import Refused, check_fake_run, check_program, sanitised_archive  # noqa: E402
from verify_protocol import Verdict, VerifyReport  # noqa: E402

DATA_SUFFIX = "/.cache/autoresearch"         # where the evaluation code looks under $HOME
CALL_MAX_BYTES = 1 << 20                     # call.json
HELDOUT_SECRET = "0" * protocol.SECRET_CHARS  # the held-out pass answers through a pipe only it holds
# Each probed row tests one cut for reading the next token, so the probe's power is its rows:
# a model that reads ahead at a share f of positions passes with probability (1 - f) ** rows.
PROBE_ROWS_MIN = 256                         # rows the causality probe evaluates again (all, when fewer were scored)
PROBE_SHARE = 0.25                           # ... or this share of the rows scored, when that is more
PROBE_ROWS_MAX = 4096
PROBE_OUTPUT_BYTES = 256 << 20               # the scored outputs kept for comparison, all rows together
PROBE_POSITIONS = 16                         # compared positions per row, the cut included
DONOR_ROWS = 256                             # rows whose text fills the spliced suffixes
WHOLE_ROW_SHARE = 0.125                      # probed rows compared whole, among other companions only
PROBE_EFFECTIVE_MIN = 16                     # spliced rows that really changed, or the run is unverified
# Outputs are compared as log-probabilities (logits through log_softmax: a shift changes nothing)
# or as the losses themselves, in nats, absolutely. The same row in batches of the same shape is
# bit-identical on the kernels we know; this absorbs reduced-precision rounding where it is not,
# and bounds what could hide in it.
ATOL_NATS = {"float32": 1e-4, "low": 5e-3}
OVERLAP_MIN_CPUS = 4                         # the held-out pass loads beside the val pass on this many cores


class Unverifiable(Exception):
    """The call cannot be replayed with trusted inputs: the run is unverified."""


# --- the evaluation's arguments, rebuilt from the repo's own code ------------------------------

def _evaluation():
    module_name, _, func = os.environ[protocol.TARGET_ENV].rpartition(".")
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


def _rebuild(value, name: str, module):
    """A required argument the run passed: plain data as it is, a device if it is one, an object
    (recorded by its type's name) made anew from the evaluation module."""
    import torch

    if isinstance(value, dict) and set(value) == {"device"} and isinstance(value["device"], str):
        if not re.fullmatch(r"(cpu|cuda)(:\d+)?", value["device"]):
            raise Unverifiable(f"the evaluation argument {name} is a device the verifier does not use")
        return torch.device(value["device"])
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if not (isinstance(value, dict) and set(value) == {"object"} and isinstance(value["object"], str)):
        raise Unverifiable(f"the evaluation argument {name} is neither plain data nor an object to rebuild")
    kind = value["object"]
    hint = (f"the evaluation argument {name} (a {kind}) cannot be rebuilt from {module.__name__}: "
            f"say how in runner.yaml, e.g. verify_args: {{{name}: \"Tokenizer.from_directory()\"}}")
    prefix = module.__name__ + "."
    if not kind.startswith(prefix):
        raise Unverifiable(hint)
    cls = _attribute(module, kind[len(prefix):])
    makers = [cls] if _needs_no_arguments(cls) else [
        getattr(cls, n) for n, v in vars(cls).items() if isinstance(v, classmethod) and _needs_no_arguments(getattr(cls, n))]
    if not isinstance(cls, type) or len(makers) != 1:
        raise Unverifiable(hint)
    made = makers[0]()
    if not isinstance(made, cls):
        raise Unverifiable(hint)
    return made


def _read_call(folder: str) -> dict:
    import stat

    path = os.path.join(folder, protocol.CALL_FILE)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise Unverifiable("call.json is not a regular file")
        data = f.read(CALL_MAX_BYTES + 1)
    if len(data) > CALL_MAX_BYTES:
        raise Unverifiable("call.json is too large")
    call = json.loads(data)
    if not (isinstance(call, dict) and isinstance(call.get("args"), list) and isinstance(call.get("kwargs"), dict)):
        raise Unverifiable("call.json does not describe an evaluation call")
    return call


def _arguments(call: dict, module, function):
    """The evaluation's arguments after the model, bound by its own signature, never by names the
    run wrote: runner.yaml's verify_args where they name a parameter; a parameter with a default
    gets its default (the run cannot choose how much, or what, is scored); a required one what
    the run passed (by position, else by its name), rebuilt by `_rebuild`."""
    recipes = json.loads(os.environ.get(protocol.ARGS_ENV) or "{}")
    parameters = list(inspect.signature(function).parameters.values())[1:]
    args, kwargs = [], {}
    for i, p in enumerate(parameters):
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            break
        if p.name in recipes:
            value = _recipe(recipes[p.name], module)
        elif p.default is not p.empty:
            continue
        elif i < len(call["args"]) and p.kind != p.KEYWORD_ONLY:
            value = _rebuild(call["args"][i], p.name, module)
        elif p.name in call["kwargs"]:
            value = _rebuild(call["kwargs"][p.name], p.name, module)
        else:
            raise Unverifiable(f"the run's evaluation call gave no {p.name}")
        if p.kind == p.POSITIONAL_ONLY:
            args.append(value)
        else:
            kwargs[p.name] = value
    return args, kwargs


def _autocast(call: dict):
    """The run's autocast around its evaluation, replayed (only these devices and dtypes):
    torch.export does not record an ambient autocast, and autoresearch evaluates inside one."""
    import torch

    stack = contextlib.ExitStack()
    for entry in call.get("autocast") or []:
        if not isinstance(entry, dict):
            continue
        device, dtype = entry.get("device"), entry.get("dtype")
        if device in ("cuda", "cpu") and dtype in ("bfloat16", "float16", "float32"):
            stack.enter_context(torch.autocast(device_type=device, dtype=getattr(torch, dtype)))
    return stack


def _low_precision(call: dict, device: str) -> bool:
    """Whether the replayed autocast lowers precision where the program runs (`device`, its
    inputs' device type): an autocast for another device changes no number, so it buys no
    tolerance (call.json is the run's to write)."""
    return any(isinstance(e, dict) and e.get("device") == device and e.get("dtype") in ("bfloat16", "float16")
               for e in call.get("autocast") or [])


# --- the probes, folded into the evaluation -------------------------------------------------------

class Probes:
    """Watches every batch the evaluation scores and keeps a uniform sample of its rows (reservoir
    sampling with this process's own randomness), to evaluate them again afterwards in batches
    the model cannot tell from scored ones."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.key = None           # the first call's non-row arguments; other calls are not probed
        self.batch = 0            # the scored batch size (the first call's)
        self.seen = 0             # rows scored under `key`
        self.sample: list[dict] = []   # rows to compare: their inputs, cut, positions and scored outputs
        self.donors: list[dict] = []   # rows whose text fills the spliced suffixes
        self.capacity = PROBE_ROWS_MIN  # rows the sample holds (set from the output's width at the first call)
        self.unprobeable = ""     # why the outputs cannot be probed, when they cannot
        self.shape = None         # (index of the ids argument, per-position width)
        self.template_args, self.template_kwargs = [], {}  # the first call's arguments: probe batches replace its rows

    @staticmethod
    def _split(args, kwargs, rows: int):
        """(row tensors by slot, the rest as a hashable key): a slot is ('a', i) or ('k', name)."""
        import torch

        row, rest = {}, []
        for slot, value in [(("a", i), v) for i, v in enumerate(args)] + [(("k", k), v) for k, v in sorted(kwargs.items())]:
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == rows:
                row[slot] = value
            elif isinstance(value, torch.Tensor):
                rest.append((slot, "tensor", tuple(value.shape), str(value.dtype), value.detach().cpu().numpy().tobytes()))
            else:
                rest.append((slot, repr(value)))
        return row, tuple(rest)

    def observe(self, args, kwargs, out) -> None:
        import torch

        ids = next((i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.dim() == 2
                    and not a.is_floating_point() and not a.is_complex()), None)
        if ids is None:
            self.unprobeable = "the model is not called with a (batch, time) tensor of token ids"
            return
        x = args[ids]
        shaped = _per_position(out, x)
        if shaped is None:
            self.unprobeable = ("the model's output is not one tensor with one value or one vector per input position "
                                "(logits, or a loss per token): nothing else can be probed")
            return
        rows, rest = self._split(args, kwargs, x.shape[0])
        key = (rest, x.shape[1], tuple(sorted(rows)))
        if self.key is None:  # the first call sets what the probe batches look like
            self.key, self.batch, self.shape = key, x.shape[0], (ids, shaped.shape[-1])
            self.template_args, self.template_kwargs = list(args), dict(kwargs)
            width = PROBE_POSITIONS * max(1, shaped.shape[-1]) * 4
            self.capacity = max(self.batch, min(PROBE_ROWS_MAX, PROBE_OUTPUT_BYTES // width))
        if key != self.key:
            return
        steps = x.shape[1]
        for i in range(x.shape[0]):
            self.seen += 1
            row = {slot: v[i].detach().clone() for slot, v in rows.items()}
            self._keep(self.donors, row, DONOR_ROWS)
            j = self._slot(self.sample)
            if j is not None:
                cut = steps - 1 if self.rng.random() < WHOLE_ROW_SHARE else self.rng.randrange(steps - 1)
                positions = sorted({cut, *self.rng.sample(range(cut), min(cut, PROBE_POSITIONS - 1))})
                entry = {"row": row, "cut": cut, "positions": positions, "scored": _comparable(shaped[i, positions])}
                self._put(self.sample, j, entry)

    def _slot(self, reservoir: list, capacity: int | None = None):
        capacity = capacity or self.capacity
        if len(reservoir) < capacity:
            return len(reservoir)
        j = self.rng.randrange(self.seen)
        return j if j < capacity else None

    def _put(self, reservoir: list, j: int, entry) -> None:
        if j == len(reservoir):
            reservoir.append(entry)
        else:
            reservoir[j] = entry

    def _keep(self, reservoir: list, entry, capacity: int) -> None:
        j = self._slot(reservoir, capacity)
        if j is not None:
            self._put(reservoir, j, entry)

    # -- after the evaluation --

    def _call(self, program, rows: list[dict]):
        """The program on a batch made of `rows`, every other argument as the evaluation gave it."""
        import torch  # noqa: F401  (stack below)

        args, kwargs = list(self.template_args), dict(self.template_kwargs)
        for slot in rows[0]:
            stacked = torch.stack([r[slot] for r in rows])
            if slot[0] == "a":
                args[slot[1]] = stacked
            else:
                kwargs[slot[1]] = stacked
        return _per_position(_invoke(program, self.rng, args, kwargs), args[self.shape[0]])

    def _mixed(self, program, rows: list[dict]):
        """`_call` on `rows` in a shuffled order (where a row sits in its batch tells nothing);
        the outputs come back in the order given."""
        import torch

        order = list(range(len(rows)))
        self.rng.shuffle(order)
        out = self._call(program, [rows[i] for i in order])
        if out is None:
            return None
        back = [0] * len(order)
        for n, i in enumerate(order):
            back[i] = n
        return out[torch.tensor(back, device=out.device)]

    def _spliced(self, row: dict, cut: int) -> dict:
        """`row` with every per-position input after `cut` taken from another real row."""
        donor = self.rng.choice(self.donors)
        ids = ("a", self.shape[0])
        for _ in range(8):  # a donor that differs right after the cut, where one exists
            if cut + 1 >= len(row[ids]) or donor is not row and bool(donor[ids][cut + 1] != row[ids][cut + 1]):
                break
            donor = self.rng.choice(self.donors)
        spliced = {}
        for slot, value in row.items():
            if value.dim() >= 1 and value.shape[0] == row[ids].shape[0] and slot in donor:
                value = value.clone()
                value[cut + 1:] = donor[slot][cut + 1:]
            spliced[slot] = value
        return spliced

    def causal(self, program, close) -> tuple[bool | None, int, str]:
        """Every sampled row again, spliced after its cut, in batches of the scored shape with
        other sampled rows (or spliced donors) as companions, in a shuffled order.
        Returns (ok, or None when too few splices changed anything; positions compared; why not)."""
        entries = list(self.sample)
        self.rng.shuffle(entries)  # the reservoir is a uniform sample of the scored rows; so is any part of it
        entries = entries[:max(PROBE_ROWS_MIN, math.ceil(PROBE_SHARE * self.seen))]
        compared = effective = 0
        ids = ("a", self.shape[0])
        for start in range(0, len(entries), self.batch):
            group = entries[start:start + self.batch]
            batch = [self._spliced(e["row"], e["cut"]) for e in group]
            steps = len(batch[0][ids])
            # a splice that changed nothing (a donor equal to the row) tests nothing: not counted
            effective += sum(1 for e, b in zip(group, batch)
                             if e["cut"] + 1 >= steps or bool(b[ids][e["cut"] + 1] != e["row"][ids][e["cut"] + 1]))
            while len(batch) < self.batch:  # companions only: spliced like the rest, not compared
                filler = self.rng.choice(self.donors)
                batch.append(self._spliced(filler, self.rng.randrange(steps)))
            out = self._mixed(program, batch)
            if out is None:
                return False, compared, "the model's output lost its per-position shape on a probe batch"
            for i, e in enumerate(group):
                again = _comparable(out[i, e["positions"]])
                if again.shape != e["scored"].shape or not close(again, e["scored"]):
                    worst = (again - e["scored"]).abs().max().item() if again.shape == e["scored"].shape else float("nan")
                    return False, compared, (f"a row's outputs up to position {e['cut']} changed (by up to {worst:.3g}) when "
                                             f"the text after it or the other rows of its batch changed")
                compared += len(e["positions"])
        if effective < PROBE_EFFECTIVE_MIN:
            return None, compared, (f"the evaluation scored too few distinct rows to probe ({effective} spliced rows "
                                    f"changed, {PROBE_EFFECTIVE_MIN} needed)")
        return True, compared, ""


def _comparable(out):
    """Outputs as compared, in nats: logits as log-probabilities (a shift of all logits, which
    changes nothing scored, cannot hide a difference), a loss as it is."""
    out = out.detach().float()
    return out.log_softmax(-1) if out.shape[-1] > 1 else out


def _invoke(program, rng: random.Random, args, kwargs):
    """One call of the program: on copies of its inputs (it cannot write into the evaluation's
    tensors), with torch's generators reseeded from the verifier's own randomness (a random
    draw cannot count calls)."""
    import torch

    def copy(value):
        return value.clone() if isinstance(value, torch.Tensor) else value

    torch.manual_seed(rng.getrandbits(63))
    with torch.no_grad():
        return program(*map(copy, args), **{k: copy(v) for k, v in kwargs.items()})


def _held_tensors(module) -> dict:
    """Every tensor the program keeps between calls: parameters, buffers, constants."""
    import torch

    held = {}
    for prefix, sub in module.named_modules():
        for name, value in [*sub._parameters.items(), *sub._buffers.items(), *vars(sub).items()]:
            if isinstance(value, torch.Tensor):
                held[f"{prefix}.{name}" if prefix else name] = value
    return held


def _per_position(out, x):
    """The output as (batch, time, k): k = vocabulary for logits, 1 for a loss per position; or
    None. Whatever the evaluation could read must be probed, so the output is one tensor (alone
    or the one tensor of a tuple): a second one (nanoGPT's mean loss beside its logits) could
    carry a number no probe sees."""
    import torch

    if isinstance(out, (tuple, list)):
        tensors = [o for o in out if o is not None]
        out = tensors[0] if len(tensors) == 1 else None
    if not isinstance(out, torch.Tensor) or out.numel() == 0 or out.numel() % x.numel():
        return None
    return out.reshape(x.shape[0], x.shape[1], -1)


def _ids_and_targets(args, kwargs):
    """The (batch, time) token ids a loss call gives the model first, and the targets of their
    shape beside them; or None."""
    import torch

    ids = args[0] if args else None
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
        return None
    targets = [v for v in [*args[1:], *kwargs.values()] if isinstance(v, torch.Tensor)
               and v.shape == ids.shape and not v.is_floating_point() and v.dtype != torch.bool]
    return (ids, targets[0]) if len(targets) == 1 else None


def _loss_from_logits(logits, targets, dims: int):
    """The loss per position a loss model returns (cross-entropy, reduction 'none'), computed
    here from its logits: minus the log-probability of the target, 0 where the target is
    negative (an ignore_index, -1 or -100: the evaluation's data says so, not the model), in the
    layout the model's own loss had (1: (batch * time,), 2: (batch, time), 3: (batch, time, 1)).
    A target beyond the logits has no probability the model could give it: no number at all."""
    import torch

    vocab = logits.shape[-1]
    valid = targets >= 0
    if bool((targets >= vocab).any()):
        raise Unverifiable(f"a target id ({int(targets.max())}) is beyond the model's logits ({vocab} of them)")
    with torch.autocast(logits.device.type, enabled=False):
        logp = logits.float().log_softmax(-1)
        loss = -logp.gather(-1, targets.clamp(0, vocab - 1).long().unsqueeze(-1)).squeeze(-1) * valid
    return loss.reshape((-1,) if dims == 1 else (*targets.shape, 1)[:dims])


def _scored_model(program, probes: Probes, loss_dims: int = 0, keep: bool = False):
    """What the evaluation function gets in place of the model: a module that calls `program`.
    `loss_dims`: the evaluation gives the model targets and it returned a loss of that many
    dimensions; `program` is then the model on the ids alone, and the loss is computed from its
    logits (_loss_from_logits). `keep`: keep what each call handed out, for _per_nat."""
    import torch

    class Scored(torch.nn.Module):
        """What the evaluation function gets: the exported forward, nothing of train.py; every
        call is shown to the probes."""

        def __init__(self):
            super().__init__()
            self.program = program
            self.handed = []  # loss models: per call, (its ids, the loss handed out, where a target was)

        def forward(self, *args, **kwargs):
            if not loss_dims:
                out = _invoke(self.program, probes.rng, args, kwargs)
                probes.observe(args, kwargs, out)
                return out
            pair = _ids_and_targets(args, kwargs)
            if pair is None:
                raise Unverifiable("the evaluation called the model without the token ids and targets its first call had")
            ids, targets = pair
            logits = _invoke(self.program, probes.rng, (ids,), {})
            if (not isinstance(logits, torch.Tensor) or not logits.is_floating_point() or logits.dim() != 3
                    or logits.shape[:2] != ids.shape or logits.shape[2] < 2):
                raise Unverifiable(protocol.LOGITS_NEEDED)
            probes.observe((ids,), {}, logits)
            loss = _loss_from_logits(logits, targets, loss_dims)
            if keep:
                self.handed.append((ids.clone(), loss.detach(), (targets >= 0).reshape(loss.shape).to(loss.dtype)))
            return loss

        def train(self, mode=True):  # the exported graph has no modes to switch
            return self

    return Scored()


# --- the verification ---------------------------------------------------------------------------

class _Clock:
    """Seconds per phase of the verification, for the report (benchmarks/verify_cost.py)."""

    def __init__(self):
        import time

        self.time, self.seconds, self.last = time, {}, time.monotonic()

    def lap(self, phase: str) -> None:
        now = self.time.monotonic()
        self.seconds[phase] = round(self.seconds.get(phase, 0.0) + now - self.last, 3)
        self.last = now


def _load(folder: str, workdir: str, call: dict):
    import torch

    namespaces = {n for n in os.environ.get(protocol.OPS_ENV, "").split(",") if n}
    program = torch.export.load(sanitised_archive(os.path.join(folder, protocol.MODEL_FILE), workdir))
    check_program(program, namespaces)
    with _autocast(call):
        check_fake_run(program)
    return program.module()


def evaluate(folder: str, workdir: str, probes: Probes | None = None, clock: _Clock | None = None, gate=None,
             margin: bool = False):
    """The repo's own evaluation of the exported program: (val_bpb, the call, the program, the model).
    `gate`, when given, is called once everything is loaded, just before the evaluation starts;
    `margin`: keep the losses handed out where a margin may be wanted (a reduced-precision autocast)."""
    sys.path.insert(0, os.getcwd())  # the repo (/repo): its fixed evaluation code, never train.py's
    call = _read_call(folder)
    module, function = _evaluation()  # first: the repo's own kernels (verify_ops) register their operators on import
    program = _load(folder, workdir, call)
    if clock is not None:
        clock.lap("load")
    args, kwargs = _arguments(call, module, function)
    loss_dims = call.get("loss_dims", 0)
    if type(loss_dims) is not int or loss_dims not in (0, 1, 2, 3):
        raise Unverifiable(f"call.json's loss_dims is {loss_dims!r}, not 0 to 3")
    keep = margin and any(_low_precision(call, device) for device in ("cpu", "cuda"))
    model = _scored_model(program, probes or Probes(random.Random()), loss_dims, keep)
    model.held = _held_tensors(program)
    model.pristine = {name: value.detach().clone() for name, value in model.held.items()}  # before the first call
    if gate is not None:
        gate()
    with _autocast(call):
        value = function(model, *args, **kwargs)
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "__float__"):
        raise Unverifiable("the evaluation function did not return a number")
    model.again = lambda replica: float(function(replica, *args, **kwargs))
    return float(value), call, program, model


def _per_nat(model, verified: float) -> float:
    """How much the evaluation's number grows when every loss handed out grows by one nat: the
    evaluation run again on the losses it was handed the first time, each one nat higher where
    there was a target (no model call: the same batches, checked id for id). The bpb a model
    could gain inside the probe's tolerance is that tolerance times this."""
    import torch

    calls = iter(model.handed)

    class Replica(torch.nn.Module):
        def forward(self, *args, **kwargs):
            pair, handed = _ids_and_targets(args, kwargs), next(calls, None)
            if pair is None or handed is None or not torch.equal(pair[0], handed[0]):
                raise Unverifiable("the evaluation does not score the same batches when run again")
            return handed[1] + handed[2]

        def train(self, mode=True):
            return self

    grown = model.again(Replica())
    if next(calls, None) is not None:
        raise Unverifiable("the evaluation does not score the same batches when run again")
    per_nat = grown - verified
    if not (math.isfinite(per_nat) and per_nat >= 0):
        raise Unverifiable(f"the evaluation's number does not grow with the losses it sums ({per_nat!r} per nat)")
    return per_nat


class _HeldoutPass:
    """The whole verification again with $HOME/.cache/autoresearch being the held-out copy of the
    data, probes included (a model could be honest on val only), in a child process forked with
    torch imported and nothing of the repo's: the evaluation module reads its paths at import.
    It is forked before the val pass (a process that has run torch's thread pool cannot fork a
    working one) and evaluates only when `report()` tells it to, one evaluation on the device at
    a time. With cores to spare it loads the program meanwhile; on a host with few, it waits
    first (a load beside the val pass would only slow both). It answers through a pipe of its
    own; what it prints goes to a file. `present`: whether there is held-out data at all."""

    def __init__(self, folder: str):
        self.pid, self.failed, self.present = None, None, False
        data = os.environ.get(protocol.HELDOUT_ENV, "")
        if not data.endswith(DATA_SUFFIX) or not os.path.isdir(data):
            return
        try:
            self.present = bool(os.listdir(data))
        except OSError as exc:
            self.present = True
            self.failed = VerifyReport.unverified(f"the held-out data cannot be read ({exc.strerror}): make it "
                                                  f"readable by all, like the data cache")
        if not self.present or self.failed:
            return
        self.answer, answer_end = os.pipe()
        go_end, self.go = os.pipe()
        self.output = tempfile.TemporaryFile("w+")
        sys.stdout.flush()
        sys.stderr.flush()
        self.pid = os.fork()
        if self.pid == 0:  # the child: never returns
            code = 1
            try:
                os.close(self.answer)
                os.close(self.go)
                os.dup2(self.output.fileno(), 1)
                os.dup2(self.output.fileno(), 2)
                os.environ["HOME"] = data[: -len(DATA_SUFFIX)]
                code = heldout_main(folder, answer_end, go_end, overlap=_spare_cores())
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException:
                import traceback

                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        os.close(answer_end)
        os.close(go_end)

    def report(self) -> VerifyReport:
        """Its report, once it has evaluated (or failed to)."""
        if self.failed:
            return self.failed
        with contextlib.suppress(BrokenPipeError):  # it may have ended already (it failed to load)
            os.write(self.go, b"g")
        os.close(self.go)
        with os.fdopen(self.answer) as f:
            self.go = self.answer = None
            answer = f.read(1 << 16)
        _, status = os.waitpid(self.pid, 0)
        self.pid = None
        self.output.seek(0)
        printed = self.output.read()
        self.output.close()
        report = protocol.parse_report(answer, HELDOUT_SECRET)
        if report.verdict == Verdict.UNVERIFIED and not report.val_bpb:
            tail = printed.strip().splitlines()[-1:] or [f"exit {os.waitstatus_to_exitcode(status)}"]
            return VerifyReport.unverified(f"the held-out evaluation failed: {tail[0][:300]}")
        return report

    def cancel(self) -> None:
        """Stop it unheard (the val pass already decided)."""
        if self.pid is not None:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
            for fd in (self.go, self.answer):
                if fd is not None:
                    os.close(fd)
            self.output.close()
            self.pid = None


def _probe(folder: str, clock: _Clock, gate=None, margin: bool = True) -> VerifyReport:
    """Evaluate and probe: the report of one pass, on whichever data $HOME points at (`gate`: as
    for evaluate; `margin`: work out the keep margin, which only the val pass's number needs)."""
    import torch

    rng = random.Random(int.from_bytes(os.urandom(16), "big"))
    probes = Probes(rng)
    with tempfile.TemporaryDirectory() as workdir:
        verified, call, program, model = evaluate(folder, workdir, probes, clock, gate, margin)
    clock.lap("evaluate")
    if not math.isfinite(verified):
        return VerifyReport.unverified("the evaluation of the exported program gave no finite number")
    if probes.unprobeable or not probes.sample:
        return VerifyReport(Verdict.UNVERIFIED, why=probes.unprobeable or "the evaluation never called the model", val_bpb=verified)
    device = probes.template_args[probes.shape[0]].device.type
    low = _low_precision(call, device)
    atol = ATOL_NATS["low" if low else "float32"]
    # What a read-ahead inside the tolerance could gain, in the number's own units: a keep must
    # beat the best by more (computable where the losses are the verifier's own; see README)
    margin = atol * _per_nat(model, verified) if margin and low and model.handed else None
    clock.lap("margin")

    def close(a, b) -> bool:  # equal infinities are close (a logit masked to -inf); NaN never is
        return bool(torch.allclose(a, b, atol=atol, rtol=0.0))

    if probes.shape[1] == 1:  # one value per position: a loss the model states, which nothing here can trust
        return VerifyReport(Verdict.UNVERIFIED, why=protocol.LOGITS_NEEDED, val_bpb=verified)
    with _autocast(call):
        causal, compared, why = probes.causal(program, close)
        clock.lap("causal_probe")
    changed = next((name for name, before in model.pristine.items() if not torch.equal(model.held[name], before)), None)
    if changed is not None:  # whatever a probe saw, the program kept state between calls: nothing of it counts
        return VerifyReport(Verdict.REFUSED, why=f"the program wrote into {changed} while it was evaluated: state across calls")
    if causal is None:
        return VerifyReport(Verdict.UNVERIFIED, why=why, val_bpb=verified, probed_positions=compared)
    if not causal:
        return VerifyReport(Verdict.NONCAUSAL, why=why, val_bpb=verified, probed_positions=compared)
    return VerifyReport(Verdict.OK, val_bpb=verified, probed_positions=compared, margin_bpb=margin)


def verify(folder: str, clock: _Clock) -> VerifyReport:
    """The report: the evaluation on val with its probes, then on the held-out data with its own.
    Where there is held-out data, a verification without a held-out figure is not ok."""
    _warm_imports()
    clock.lap("import")
    heldout = _HeldoutPass(folder)
    try:
        report = _probe(folder, clock)
        if report.verdict != Verdict.OK or not heldout.present:
            return report
        held = heldout.report()
    finally:
        heldout.cancel()
    clock.lap("heldout")
    if held.verdict != Verdict.OK or held.val_bpb is None:
        verdict = held.verdict if held.verdict != Verdict.OK else Verdict.UNVERIFIED
        return dataclasses.replace(report, verdict=verdict, why=f"on the held-out data: {held.why}",
                                   heldout_error=held.why)
    return dataclasses.replace(report, heldout_bpb=held.val_bpb)


def _warm_imports() -> None:
    """What both passes import to load a program (torch, torch.export and its deserialiser, which
    pulls in sympy: ~3.5 s on a CPU core), imported once, before the held-out pass forks."""
    import torch.export  # noqa: F401

    with contextlib.suppress(ImportError):  # a private module: a speed-up only, wherever it lives
        importlib.import_module("torch._export.serde.serialize")


def main(folder: str) -> int:
    secret = os.environ.pop(protocol.SECRET_ENV, "")
    clock = _Clock()
    try:
        report = verify(folder, clock)
    except Refused as exc:
        report = VerifyReport(Verdict.REFUSED, why=str(exc))
    except Unverifiable as exc:
        report = VerifyReport.unverified(str(exc))
    except Exception as exc:
        report = VerifyReport.unverified(f"{type(exc).__name__}: {str(exc)[:300]}")
    clock.lap("report")
    print(dataclasses.replace(report, seconds=clock.seconds).to_line(secret), flush=True)
    return 0


def _spare_cores() -> bool:
    """Whether this process may use cores enough that a load beside an evaluation costs it nothing."""
    return len(os.sched_getaffinity(0)) >= OVERLAP_MIN_CPUS


def heldout_main(folder: str, fd: int, go: int, overlap: bool) -> int:
    """The held-out pass (in the forked child): its report through `fd`, once `go` says so
    (loaded first when `overlap`)."""
    def wait_for_go():  # evaluate once the val pass is done with the device, or not at all
        with os.fdopen(go, "rb") as f:
            if f.read(1) != b"g":
                sys.exit(0)

    if not overlap:
        wait_for_go()
    try:
        report = _probe(folder, _Clock(), wait_for_go if overlap else None, margin=False)
    except (Refused, Unverifiable) as exc:
        report = VerifyReport(Verdict.REFUSED if isinstance(exc, Refused) else Verdict.UNVERIFIED, why=str(exc))
    with os.fdopen(fd, "w") as f:
        f.write(report.to_line(HELDOUT_SECRET))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
