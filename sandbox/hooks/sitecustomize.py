"""The export hook of the verified metric, root-owned in every trainer image (on PYTHONPATH);
it also installs the runner's seed offset (seeds.py).

When the research code calls its evaluation function (AUTORESEARCH_VERIFY_TARGET, e.g.
prepare.evaluate_bpb), the model it hands over is exported with torch.export (its forward on the
evaluation input, weights included) into AUTORESEARCH_VERIFY_DIR, with the call's other arguments
and the number the function returned; a marker line tells the runner to collect the files, and
the process waits at exit (bounded) until it has. A train.py that bypasses, replaces or breaks
this leaves nothing to verify: its run is `unverified` and never kept. Nothing here decides
anything: a separate container evaluates the exported program with the repo's own code.
"""

import os
import sys

import seeds  # next to this file, root-owned: the runner's seed offset (AUTORESEARCH_SEED)
import verify_protocol as protocol

seeds.install()

_TARGET = os.environ.get(protocol.TARGET_ENV, "")
_OUT = os.environ.get(protocol.DIR_ENV, protocol.EXPORT_DIR)
_COLLECT_WAIT_S = 30.0  # the runner collects within a poll period; this only bounds a lost runner


def _jsonable(value):
    """An evaluation argument as call.json records it: plain data as itself; an object (a
    tokenizer) by its type's name only, for the verifier to rebuild from the repo's own code:
    what train.py handed over is never replayed."""
    import torch

    if isinstance(value, torch.device):
        return {"device": str(value)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return {"object": f"{type(value).__module__}.{type(value).__qualname__}"}


def _wait_collected():
    import time

    deadline = time.monotonic() + _COLLECT_WAIT_S
    while time.monotonic() < deadline and not os.path.exists(os.path.join(_OUT, protocol.COLLECTED_FILE)):
        time.sleep(0.1)


def _autocast_state():
    """The autocast the evaluation runs under (autoresearch evaluates inside a bf16 autocast):
    torch.export does not record an ambient autocast, so the verifier replays it."""
    import torch

    state = []
    for device in ("cuda", "cpu"):
        try:
            if torch.is_autocast_enabled(device):
                state.append({"device": device, "dtype": str(torch.get_autocast_dtype(device)).replace("torch.", "")})
        except (AttributeError, RuntimeError, TypeError):
            pass
    return state


def _export(model, captured, args, kwargs, result, autocast):
    import atexit
    import inspect
    import json

    import torch

    if not captured:
        raise RuntimeError("the evaluation function never called the model")
    call_args, call_kwargs, training = captured[0]
    target = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: export what it wraps
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    # Every tensor input (and keyword input: model(x, targets=y)) is dynamic in its batch only.
    bound = inspect.signature(target.forward).bind(*call_args, **call_kwargs).arguments
    dynamic = {name: {0: batch} if isinstance(value, torch.Tensor) and value.dim() >= 1 else None
               for name, value in bound.items()}
    # In the mode the evaluation ran it (tinylm's evaluate_bpb calls model.train() on its way out:
    # exported in training mode, a dropout would make the verifier's outputs random).
    was_training = target.training
    target.train(training)
    try:
        program = torch.export.export(target, tuple(call_args), kwargs=dict(call_kwargs),
                                      dynamic_shapes=dynamic if any(dynamic.values()) else None, strict=False)
    finally:
        target.train(was_training)
    os.makedirs(_OUT, exist_ok=True)
    torch.export.save(program, os.path.join(_OUT, protocol.MODEL_FILE))
    first = call_args[0] if call_args and isinstance(call_args[0], torch.Tensor) else None
    with open(os.path.join(_OUT, protocol.CALL_FILE), "w") as f:
        json.dump({"args": [_jsonable(a) for a in args],
                   "kwargs": {k: _jsonable(v) for k, v in kwargs.items()},
                   "batch": int(first.shape[0]) if first is not None and first.dim() else 1, "autocast": autocast,
                   "self_reported": float(result)}, f)
    atexit.register(_wait_collected)
    print(protocol.EXPORT_MARK, flush=True)


def _wrap(module, name):
    original = getattr(module, name, None)
    if not callable(original):
        return

    def evaluate(model, *args, **kwargs):
        captured = []
        handle = None
        autocast = _autocast_state()
        if hasattr(model, "register_forward_pre_hook"):
            handle = model.register_forward_pre_hook(
                lambda mod, a, kw: captured.append((a, kw, mod.training)) if not captured else None, with_kwargs=True)
        try:
            result = original(model, *args, **kwargs)
        finally:
            if handle is not None:
                handle.remove()
        if not getattr(evaluate, "exported", False):
            evaluate.exported = True
            try:
                _export(model, captured, args, kwargs, result, autocast)
            except Exception as exc:  # nothing to verify: the run is unverified
                print(f"AUTORESEARCH_VERIFY_FAILED {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        return result

    evaluate.__doc__ = getattr(original, "__doc__", None)
    setattr(module, name, evaluate)


def _install():
    import after_import  # next to this file, root-owned

    module_name, _, func = _TARGET.rpartition(".")
    after_import.install({module_name: lambda module: _wrap(module, func)})


if _TARGET and "." in _TARGET:
    _install()
