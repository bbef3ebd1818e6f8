"""The export hook of the verified metric, root-owned in every trainer image (on PYTHONPATH);
it also installs the runner's seed offset (seeds.py).

When the research code calls its evaluation function (AUTORESEARCH_VERIFY_TARGET, e.g.
prepare.evaluate_bpb), the model it hands over is exported with torch.export (its forward on the
evaluation input, weights included) into AUTORESEARCH_VERIFY_DIR, with the call's other arguments
and the number the function returned. Where the evaluation hands the model targets beside the
token ids (autoresearch's model(x, y, reduction='none') returns a loss per position), what is
exported is the model called with the ids alone, which must return logits: the verifier computes
the loss itself, so no loss the model states is ever summed (a stated loss could claim more
probability than there is). A marker line tells the runner to collect the files, and
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


def _loss_dims(call_args, call_kwargs, output):
    """The dimensions of the loss per position the model returned (1: (batch * time,), 2 or 3:
    (batch, time[, 1])) when it was called with token ids first and targets of their shape beside
    them; else 0 (a model that returns logits, exported as it was called)."""
    import torch

    ids = call_args[0] if call_args else None
    if not (isinstance(ids, torch.Tensor) and ids.dim() == 2 and not ids.is_floating_point()):
        return 0
    targets = [v for v in [*call_args[1:], *call_kwargs.values()] if isinstance(v, torch.Tensor)
               and tuple(v.shape) == tuple(ids.shape) and not v.is_floating_point() and v.dtype != torch.bool]
    if not targets or not isinstance(output, torch.Tensor) or output.numel() != ids.numel():
        return 0
    return output.dim() if output.dim() in (1, 2, 3) else 0


def _export(model, captured, args, kwargs, result, autocast):
    import atexit
    import inspect
    import json

    import torch

    if not captured:
        raise RuntimeError("the evaluation function never called the model")
    call_args, call_kwargs, training, loss_dims = captured[0]
    target = getattr(model, "_orig_mod", model)  # torch.compile's wrapper: export what it wraps
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    if loss_dims:  # a loss per position: export the model on the ids alone, for its logits
        call_args, call_kwargs = call_args[:1], {}
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
    except Exception as exc:
        if not loss_dims:
            raise
        raise RuntimeError(f"{protocol.LOGITS_NEEDED} ({type(exc).__name__}: {str(exc)[:200]})") from None
    finally:
        target.train(was_training)
    os.makedirs(_OUT, exist_ok=True)
    torch.export.save(program, os.path.join(_OUT, protocol.MODEL_FILE))
    first = call_args[0] if call_args and isinstance(call_args[0], torch.Tensor) else None
    with open(os.path.join(_OUT, protocol.CALL_FILE), "w") as f:
        json.dump({"args": [_jsonable(a) for a in args],
                   "kwargs": {k: _jsonable(v) for k, v in kwargs.items()},
                   "batch": int(first.shape[0]) if first is not None and first.dim() else 1, "autocast": autocast,
                   "loss_dims": loss_dims, "self_reported": float(result)}, f)
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

        def first_call(mod, a, kw, out):  # its arguments, mode, and the shape of a loss it returned
            if not captured:
                captured.append((a, kw, mod.training, _loss_dims(a, kw, out)))

        if hasattr(model, "register_forward_hook"):
            handle = model.register_forward_hook(first_call, with_kwargs=True)
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
                print(f"{protocol.EXPORT_FAILED_MARK} {type(exc).__name__}: {str(exc)[:400]}", flush=True)
        return result

    evaluate.__doc__ = getattr(original, "__doc__", None)
    setattr(module, name, evaluate)


def _install():
    import after_import  # next to this file, root-owned

    module_name, _, func = _TARGET.rpartition(".")
    after_import.install({module_name: lambda module: _wrap(module, func)})


if _TARGET and "." in _TARGET:
    _install()
