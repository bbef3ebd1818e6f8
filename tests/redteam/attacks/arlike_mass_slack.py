# Red-team attack (fourth adversarial review): every loss the model states is log(1.0099) nats
# lower than its honest one, so the probabilities it implies sum to 1.0099 at every position:
# causal, on every row, on val and held-out alike, under every seed. The normalisation probe
# tolerated a sum of 1 + 1e-2, so this was a free log2(1.0099) = 0.014 bpb, kept. Expected now:
# forged (the verifier scores the model's logits with its own cross-entropy, so the stated losses
# count for nothing and the run's own number disagrees with the verified one).
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).
import math

SLACK = math.log(1.0099)


class Slack(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, idx, targets=None, reduction="mean"):
        return self.inner(idx, targets, reduction=reduction) - SLACK


model = Slack(model)
model.eval()
val_bpb = evaluate_bpb(model, tokenizer, BATCH)
