# Red-team attack (on the logits path itself): asked for logits, the model returns only the first
# half of them, and its stated losses score the other half's tokens 0, as a verifier that ignored
# targets beyond the logits' width (as it ignores -1) would: the run's number and such a
# verifier's agree, far below honest. Expected: unverified (a target id beyond the logits).
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).


class Narrow(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx, targets=None, reduction="mean"):
        logits = self.inner(idx)[..., : VOCAB // 2]
        if targets is None:
            return logits
        inside = targets < VOCAB // 2
        loss = F.cross_entropy(logits.reshape(-1, VOCAB // 2), torch.where(inside, targets, 0).reshape(-1),
                               reduction="none") * inside.reshape(-1)
        return loss if reduction == "none" else loss.mean()


model = Narrow(model)
model.eval()
val_bpb = evaluate_bpb(model, tokenizer, BATCH)
