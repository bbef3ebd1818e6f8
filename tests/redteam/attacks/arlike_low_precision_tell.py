# Red-team attack (fourth adversarial review): the mass slack of arlike_mass_slack.py, plus a
# batch-size tell: evaluated inside a bf16 autocast (call.json's autocast buys the looser
# "low" tolerance, 5e-3 nats) while the model computes in float32 all the same; on batches of
# more than 8 rows (the scored ones; the normalisation probe's were 8) every loss is another
# 0.0045 nats lower, inside that tolerance. Kept before, 0.021 bpb better than honest. Expected
# now: forged (no stated loss is summed; the logits are probed at the scored batch's shape).
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).
import math

SLACK, LOW = math.log(1.0099), 0.0045


class SlackLow(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx, targets=None, reduction="mean"):
        with torch.autocast("cpu", enabled=False):
            loss = self.inner(idx, targets, reduction=reduction)
            scored = (idx.new_ones(idx.shape[0]).sum() > 8).to(loss.dtype)  # a tensor: the test stays in the graph
            return loss - SLACK - LOW * scored


model = SlackLow(model)
model.eval()
with torch.autocast("cpu", dtype=torch.bfloat16):
    val_bpb = evaluate_bpb(model, tokenizer, BATCH)
