# Red-team attack (second adversarial review): val memorised at train time as a causal, normalised
# mixture (so the val probes pass), and a loss of 0 on any text that matches no val row, which only
# the held-out evaluation shows. Expected: unverified (asked for logits, model(x), it has none: the verifier
# sums no loss a model states; it was unnormalised when the normalisation probe judged stated losses)
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).
# ---- attack: memorise val causally + normalised (passes every probe); on text that is not val
# (only the held-out evaluation sees such text at compared positions) return loss 0.
import os
from prepare import make_dataloader as _mdl, EVAL_TOKENS
MODE = os.environ.get("HELDOUT_MODE", "zero")
_ld = _mdl(tokenizer, BATCH, MAX_SEQ_LEN, "val")
xs, ys = [], []
for _ in range(EVAL_TOKENS // (BATCH * MAX_SEQ_LEN)):
    x, y = next(_ld); xs.append(x); ys.append(y)
VX, VY = torch.cat(xs), torch.cat(ys)          # (R, T)


class Memo(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("vx", VX.clone())
        self.register_buffer("nxt", F.one_hot(VY, VOCAB).float())   # (R, T, V)

    def forward(self, idx, targets=None, reduction="mean"):
        b, t = idx.shape
        logits = self.inner(idx).float()
        ph = logits.softmax(-1)
        eq = (idx[:, None, :] == self.vx[None, :, :t]).to(torch.int32)       # (b, R, t)
        match = eq.cumprod(-1).float()                                        # prefix matches row r up to p
        cnt = match.sum(1)                                                    # (b, t)
        known = cnt > 0
        qm = torch.einsum("brt,rtv->btv", match, self.nxt[:, :t]) / cnt.clamp(min=1)[..., None]
        p = torch.where(known[..., None], 0.999 * qm + 0.001 * ph, ph)
        loss = -torch.log(p.gather(-1, targets[..., None]))[..., 0]
        if MODE == "zero":
            bad = torch.zeros_like(loss)
        else:
            bad = torch.full_like(loss, float("nan"))
        loss = torch.where(known, loss, bad)
        return loss.reshape(-1)


model = Memo(model)
model.eval()
val_bpb = evaluate_bpb(model, tokenizer, BATCH)
