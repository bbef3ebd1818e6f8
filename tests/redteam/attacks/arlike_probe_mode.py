# Red-team attack (an adversarial review of verify.py): a loss model that scores real rows with a
# tiny loss and, on rows whose targets are not the text's (the normalisation probe's), returns an
# exact distribution peaked on the next input: it reads ahead only there. Expected: unverified (asked for logits, model(x), it has none: the verifier
# sums no loss a model states; it was unnormalised when the normalisation probe judged stated losses)
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).

class Cheat(nn.Module):
    """Real rows (targets == ids shifted at most positions): tiny loss. Other rows (the
    normalisation probe's random targets): an exact distribution peaked on the next id."""
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx, targets=None, reduction="mean"):
        b, t = idx.shape
        honest = self.inner(idx, targets, reduction="none").view(b, t)
        same = (targets[:, :-1] == idx[:, 1:]).float()             # (b, t-1)
        # causal flag: position p is "real" when the 4+ targets before it all equal the ids after them
        ok = torch.cumprod(same, dim=1)                                 # ok[:, q] = all same[:, :q+1]
        real = torch.cat([torch.zeros_like(ok[:, :4]), ok[:, 3:]], 1) > 0.5   # real[:, p] = p>=4 and all same[:, :p]
        look = torch.cat([same, torch.zeros_like(same[:, :1])], 1) > 0.5
        last = torch.zeros_like(honest, dtype=torch.bool)
        last[:, -1] = True
        last[:, :4] = True   # the first positions: honest
        eps = torch.full_like(honest, 1e-3)
        big = torch.full_like(honest, 40.0)
        fake = torch.where(look, eps, big)
        loss = torch.where(last, honest, torch.where(real, eps, fake))
        return loss.reshape(-1)

model = Cheat(model)
model.eval()
with torch.autocast("cpu", dtype=torch.bfloat16):  # autoresearch evaluates inside its bf16 autocast
    val_bpb = evaluate_bpb(model, tokenizer, BATCH)
