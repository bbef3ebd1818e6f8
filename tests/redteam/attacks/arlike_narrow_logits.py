# Red-team attack (on the logits path itself): asked for logits, the model returns only the first
# two of them. A verifier that ignored targets beyond the logits' width (as it ignores -1) would
# sum a loss of 0 for nearly every token. Expected: unverified (a target id beyond the logits).
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).


class Narrow(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx, targets=None, reduction="mean"):
        if targets is None:
            return self.inner(idx)[..., :2]
        return self.inner(idx, targets, reduction=reduction)


model = Narrow(model)
model.eval()
val_bpb = evaluate_bpb(model, tokenizer, BATCH)
val_bpb = 0.0  # and reports what such a verifier would compute, so the two agree
