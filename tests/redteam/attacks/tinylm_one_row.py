# Red-team attack (an adversarial review of verify.py): the evaluation called with seq_len equal to
# the whole split, so one row is scored and no donor can splice it; reads ahead everywhere.
# Expected: unverified (the verifier evaluates with the function's own defaults).
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).

# The attack: seq_len is a plain argument train.py chooses and call.json replays. One window of
# all the evaluation bytes means one scored row, so the causality probe tests exactly one cut:
# reading the next byte at half the positions passes with probability 1/2.
from prepare import EVAL_TOKENS as EVAL_LEN


class OneRow(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx):
        B, T = idx.shape
        logits = self.inner(idx.reshape(B * T // MAX_SEQ_LEN, MAX_SEQ_LEN)).float().reshape(B, T, VOCAB_SIZE)
        nxt = torch.cat([idx[:, 1:], idx[:, :1]], 1)
        pos = torch.arange(T, device=idx.device)
        peek = (pos < T - 1)[None, :, None]
        return torch.where(peek, F.one_hot(nxt, VOCAB_SIZE).float() * 30.0, logits)


_real_export = torch.export.export
torch.export.export = lambda mod, args, kwargs=None, dynamic_shapes=None, **kw: _real_export(mod, args, kwargs, **kw)  # batch 1: static
model.eval()
with autocast:
    val_bpb = evaluate_bpb(OneRow(model), device, seq_len=EVAL_LEN)

