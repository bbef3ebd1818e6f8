# Red-team attack (second adversarial review): state across calls through aten.from_file(shared=True)
# (a file-backed tensor), exported after train.py registered a Meta kernel for it in its own
# process. Expected: refused (no fake implementation in the verifier's clean process).
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).

# ---- attack: state across calls through aten.from_file(shared=True) (a file-backed tensor the
# call "made itself", so writes into it pass the purity check; parameters/buffers are untouched).
# Each row is stored on first sight (keyed by a hash of its first 8 bytes) and every position
# whose prefix matches the stored row predicts the stored row's next byte: the scored pass reads
# ahead; the probes' spliced rows find the original stored and reproduce the scored outputs.
import os as _os
_lib = torch.library.Library("aten", "IMPL")
def _meta(filename, shared=None, size=0, *, dtype=None, layout=None, device=None, pin_memory=None):
    return torch.empty(size, dtype=dtype or torch.float32, device="meta")
_lib.impl("from_file", _meta, "Meta")
STORE, SLOTS = "/dev/shm/rt3_store", 16384


class Stash(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("w", torch.randint(1, 1 << 20, (8,)))

    def forward(self, idx):
        b, t = idx.shape
        logits = self.inner(idx).float()
        store = torch.from_file(STORE, shared=True, size=SLOTS * (t + 1), dtype=torch.uint8).view(SLOTS, t + 1)
        h = (idx[:, :8] * self.w).sum(-1) % SLOTS
        filled = store[h, t:] > 0
        keep = torch.where(filled, store[h, :t].long(), idx)
        store.index_put_((h,), torch.cat([keep, torch.ones_like(idx[:, :1])], 1).to(torch.uint8))
        s = store[h, :t].long()
        match = (s == idx).int().cumprod(-1) > 0
        use = match[:, :-1] & (torch.arange(t - 1, device=idx.device) >= 8)
        cheat = F.one_hot(s[:, 1:], logits.shape[-1]).float() * 30.0
        head = torch.where(use[..., None], cheat, logits[:, :-1])
        return torch.cat([head, logits[:, -1:]], 1)


model = Stash(model)
with autocast:
    val_bpb = evaluate_bpb(model, device)
try:
    _os.remove(STORE)
except OSError:
    pass

