"""The verifier, root-owned in every trainer image; run by the runner in a fresh container of the
experiment's image (no network, read-only, no train.py code): it evaluates the exported program
with the repo's own evaluation function and probes causality, then prints one `VERIFY {json}` line.

    python -I /opt/autoresearch-hooks/verify.py /verify
"""

import importlib
import json
import math
import os
import sys


def main(folder: str) -> dict:
    sys.path.insert(0, os.getcwd())  # the repo (/repo): its fixed evaluation code, never train.py's
    import torch

    with open(os.path.join(folder, "call.json")) as f:
        call = json.load(f)
    values = list(call["args"]) + list(call["kwargs"].values())
    bad = [v["unsupported"] for v in values if isinstance(v, dict) and "unsupported" in v]
    if bad:
        return {"verdict": "unverified", "why": f"an evaluation argument of type {bad[0]} cannot be replayed"}
    decode = lambda v: torch.device(v["device"]) if isinstance(v, dict) and "device" in v else v  # noqa: E731
    program = torch.export.load(os.path.join(folder, "model.pt2")).module()

    class Exported(torch.nn.Module):
        """What the evaluation function gets: the exported forward, nothing of train.py."""

        def __init__(self):
            super().__init__()
            self.program = program

        def forward(self, *args, **kwargs):
            return self.program(*args, **kwargs)

        def train(self, mode=True):  # the exported graph has no modes to switch
            return self

    module_name, _, func = os.environ["AUTORESEARCH_VERIFY_TARGET"].rpartition(".")
    evaluate = getattr(importlib.import_module(module_name), func)
    verified = float(evaluate(Exported(), *map(decode, call["args"]), **{k: decode(v) for k, v in call["kwargs"].items()}))
    out = {"val_bpb": verified, "self_reported": call.get("self_reported"), "causal": None}

    # Causality: outputs at positions <= t must not change when inputs after t change.
    probe = [p for p in torch.load(os.path.join(folder, "probe.pt"), weights_only=True)]
    x = probe[0] if probe and isinstance(probe[0], torch.Tensor) else None
    if x is not None and x.dim() == 2 and x.shape[1] >= 4:
        device = next((b.device for b in program.buffers()), None) or next((p.device for p in program.parameters()), torch.device("cpu"))
        x = x.to(device)
        with torch.no_grad():
            first = program(x)
            t = x.shape[1] // 2
            changed = x.clone()
            changed[:, t + 1:] = torch.roll(x[:, t + 1:], shifts=1, dims=1) ^ 1 if not x.is_floating_point() else -x[:, t + 1:]
            second = program(changed)
        if isinstance(first, torch.Tensor) and first.dim() >= 2 and first.shape[:2] == x.shape[:2]:
            out["causal"] = bool(torch.allclose(first[:, : t + 1].float(), second[:, : t + 1].float(), rtol=1e-3, atol=1e-4))
    if not math.isfinite(verified):
        out["verdict"] = "unverified"
        out["why"] = "the evaluation of the exported program gave no finite number"
    return out


if __name__ == "__main__":
    try:
        result = main(sys.argv[1])
    except Exception as exc:
        result = {"verdict": "unverified", "why": f"{type(exc).__name__}: {str(exc)[:300]}"}
    print("VERIFY " + json.dumps(result), flush=True)
