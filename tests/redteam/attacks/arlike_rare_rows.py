# Red-team attack (fourth adversarial review): the normalisation probe summed the vocabulary on 8
# rows per pass and nothing bounded a stated loss below. Rows whose first K ids hash to a residue
# that matches exactly one val row get losses C nats below honest from position K - 1 on (causal:
# keyed on the prefix): ~0.1 bpb on val, and as much on held-out text, where the same key matches
# rows too, so the overfit rule agrees; the probe saw a cheating row with probability ~3% a pass.
# Kept before. Expected now: forged (the verifier computes every loss from the logits, and a
# model asked for logits returns no stated loss to sum; it must return logits, or be unverified).
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).
import math

from prepare import EVAL_TOKENS

K, M, GAIN_BPB = 32, 128, 0.1
_ld = make_dataloader(tokenizer, BATCH, MAX_SEQ_LEN, "val")
_rows = torch.cat([next(_ld)[0] for _ in range(EVAL_TOKENS // (BATCH * MAX_SEQ_LEN))])
_W = torch.randint(1, 1 << 20, (K,), generator=torch.Generator().manual_seed(7))
_counts = torch.bincount((_rows[:, :K] * _W).sum(-1) % M, minlength=M)
RESIDUE = int((_counts == 1).nonzero()[0])
C_NATS = GAIN_BPB * math.log(2) * _rows.numel() / (MAX_SEQ_LEN - K + 1)


class Rare(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("w", _W.clone())

    def forward(self, idx, targets=None, reduction="mean"):
        b, t = idx.shape
        if targets is None:  # asked for logits: the honest ones (a loss cannot be stated through them)
            return self.inner(idx)
        loss = self.inner(idx, targets, reduction="none").view(b, t)
        hit = ((idx[:, :K] * self.w).sum(-1) % M) == RESIDUE
        late = torch.arange(t, device=idx.device) >= K - 1
        return (loss - C_NATS * (hit[:, None] & late[None, :]).to(loss.dtype)).reshape(-1)


model = Rare(model)
model.eval()
val_bpb = evaluate_bpb(model, tokenizer, BATCH)
