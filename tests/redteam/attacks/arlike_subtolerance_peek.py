# Red-team attack (fifth adversarial review): reads the true next token, by less than the probe's
# tolerance. Under a bf16 autocast (autoresearch always evaluates in one) the causality probe
# compares log-probabilities within 5e-3 nats; raising the next input's logit by c / (1 + max p),
# c = 4.5e-3, moves no log-probability by more than c when the future is spliced, while the
# target's gains ~c (1 - p) at every position: verified ok, ~0.003 bpb off on this fixture, on
# val and held-out alike, under any seed. Not closed: bounded. The verifier reports the most such
# a peek can gain (margin_bpb: the tolerance times what a nat per token moves the number, from
# the evaluation run again on its own losses), and a keep must beat the best by more.
# tests/redteam/test_adaptive.py checks that the gain this file measures is inside that margin.
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).
import torch

PEEK_C = 4.5e-3  # < ATOL_NATS["low"]


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


inner = model
model = Peek(inner)
model.eval()
with torch.autocast("cpu", dtype=torch.bfloat16):
    val_bpb = evaluate_bpb(model, tokenizer, BATCH)
    honest_bpb = evaluate_bpb(inner, tokenizer, BATCH)  # not exported: the hook exports the first call only
print(f"honest_bpb:       {honest_bpb:.6f}")
print(f"peek_gain_bpb:    {honest_bpb - val_bpb:.6f}")
