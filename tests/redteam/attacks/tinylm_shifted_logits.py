# Red-team attack (an adversarial review of verify.py): logits + 1e4 + 8 x one-hot(next byte): a
# relative tolerance scaled by the shift would hide the 8-nat read-ahead. Expected: noncausal.
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).

# The attack: logits are shift-invariant under softmax, the probe's tolerance is relative to
# their size. Shift every logit by 1e4: rtol 1e-3 then hides a boost of 8 nats on the next byte.
SHIFT, BOOST = 1.0e4, 8.0


class Peek(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx):
        logits = self.inner(idx).float()
        nxt = torch.cat([idx[:, 1:], idx[:, :1]], 1)
        boost = F.one_hot(nxt, VOCAB_SIZE).float() * BOOST
        boost[:, -1] = 0.0
        return logits + SHIFT + boost


model.eval()
with autocast:
    val_bpb = evaluate_bpb(Peek(model), device)

