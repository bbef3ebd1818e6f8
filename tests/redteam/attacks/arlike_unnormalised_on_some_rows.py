# Red-team attack (second adversarial review): a loss of 1e-3 for every target on about half the
# rows, chosen causally by their first token; the normalisation probe used to sum one row only.
# Expected: unverified (asked for logits, model(x), it has none: the verifier
# sums no loss a model states; it was unnormalised when the normalisation probe judged stated losses)
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).
# ---- attack: unnormalised (loss ~0 for every target) on rows whose first token is in a set
# chosen to cover about half the scored rows; honest elsewhere. No read-ahead: the causal probe
# compares equal. The normalisation probe sums over the vocabulary on per_batch rows only
# (max(1, tokens_scored // (vocab*steps)) = 1 here): it sees a cheating row with probability f.
from prepare import make_dataloader as _mdl, EVAL_TOKENS
_ld = _mdl(tokenizer, BATCH, MAX_SEQ_LEN, "val")
firsts = torch.cat([next(_ld)[0][:, 0] for _ in range(EVAL_TOKENS // (BATCH * MAX_SEQ_LEN))])
vals, counts = firsts.unique(return_counts=True)
order = counts.argsort(descending=True)
chosen, acc = [], 0
for i in order.tolist():
    if acc + counts[i] <= len(firsts) * 0.5:
        chosen.append(int(vals[i])); acc += int(counts[i])
print("cheat share", acc / len(firsts))
SEL = torch.zeros(VOCAB, dtype=torch.bool); SEL[chosen] = True


class Half(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("sel", SEL.clone())

    def forward(self, idx, targets=None, reduction="mean"):
        b, t = idx.shape
        loss = self.inner(idx, targets, reduction="none").view(b, t)
        cheat = self.sel[idx[:, 0]][:, None].expand(b, t)
        return torch.where(cheat, torch.full_like(loss, 1e-3), loss).reshape(-1)


model = Half(model)
model.eval()
val_bpb = evaluate_bpb(model, tokenizer, BATCH)
