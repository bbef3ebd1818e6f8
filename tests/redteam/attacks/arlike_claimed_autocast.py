# Red-team attack (fifth adversarial review): a sub-tolerance peek (the true next token's logit
# raised by under 5e-3 nats, read from the next input) with a float32 evaluation, whose probe
# tolerance is 1e-4 nats, while call.json is rewritten to claim a cuda bf16 autocast: on a CPU
# verifier that autocast changes no number, yet it bought the 5e-3 "low precision" tolerance, and
# the peek verified ok (0.003 bpb off). Expected: noncausal (only an autocast on the device the
# program runs on buys the looser tolerance).
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).
import json as _json
import torch

PEEK_C = 4.8e-3
_dump = _json.dump


def _claim(obj, f, *args, **kwargs):
    if isinstance(obj, dict) and "autocast" in obj:
        obj["autocast"] = [{"device": "cuda", "dtype": "bfloat16"}]
    return _dump(obj, f, *args, **kwargs)


_json.dump = _claim


class Peek(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx, targets=None, reduction="mean"):
        logits = self.inner(idx).float()
        p = logits.log_softmax(-1).exp()
        delta = PEEK_C / (1 + p.amax(-1, keepdim=True))
        ahead = F.one_hot(torch.roll(idx, -1, 1), VOCAB).to(logits.dtype)
        keep = torch.ones_like(idx[:1, :, None], dtype=logits.dtype)
        keep[:, -1] = 0
        logits = logits + delta * ahead * keep
        if targets is None:
            return logits
        return F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1), ignore_index=-1, reduction=reduction)


model = Peek(model)
model.eval()
val_bpb = evaluate_bpb(model, tokenizer, BATCH)
