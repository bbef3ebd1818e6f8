# Red-team attack (an adversarial review of verify.py): the export is patched to copy a memory of
# every scored row into a buffer through aten.unsafe_split (a view without alias annotation), so
# the probe batches are recognised and answered from memory. Expected: refused (state across calls).
#
# Spliced into the example's train.py in place of its evaluation (tests/redteam/test_adaptive.py).

# ---------------------------------------------------------------------------
# The attack: a memory of rows kept in a buffer across calls (written through an alias the
# verifier's alias analysis does not see: aten.unsafe_split returns views without alias info).
# ---------------------------------------------------------------------------
import operator
L, NMEM = 16, 2048


class Pure(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.register_buffer("mem", torch.full((NMEM + 1, MAX_SEQ_LEN), -1, dtype=torch.long))
        self.register_buffer("count", torch.zeros(1, dtype=torch.long))

    def step(self, idx):
        B, T = idx.shape
        mem = self.mem[:, :T]
        honest = self.inner(idx).float()
        pref = (idx[:, None, :] == mem[None, :NMEM, :]).long().cumprod(2).sum(2)       # (B, N)
        new = pref.max(1).values < L
        slot = self.count + torch.cumsum(new.long(), 0) - 1
        slot = torch.where(new & (slot < NMEM), slot, torch.full_like(slot, NMEM))
        mem_new = mem.index_put((slot,), idx)
        count_new = self.count + new.long().sum()
        pref2 = (idx[:, None, :] == mem_new[None, :NMEM, :]).long().cumprod(2).sum(2)
        r = pref2.argmax(1)
        nxt = mem_new[r]                                                              # (B, T)
        nxt = torch.cat([nxt[:, 1:], nxt[:, :1]], 1).clamp(min=0)
        pos = torch.arange(T, device=idx.device)
        mask = ((pos >= L) & (pos <= T - 2))[None, :] & (pref2.max(1).values >= L)[:, None]
        peak = F.one_hot(nxt, VOCAB_SIZE).float() * 30.0
        logits = torch.where(mask[..., None], peak, honest)
        full = self.mem.clone()
        full[:, :T] = mem_new
        return logits, full, count_new

    def forward(self, idx):
        logits, full, count_new = self.step(idx)
        return logits + 0.0 * (full.sum() + count_new.sum()).float()


class Stateful(nn.Module):
    def __init__(self, pure):
        super().__init__()
        self.pure = pure

    def forward(self, idx):
        logits, full, count_new = self.pure.step(idx)
        self.pure.mem.copy_(full)
        self.pure.count.copy_(count_new)
        return logits


pure = Pure(model)
stateful = Stateful(pure)
_real_export = torch.export.export


def _export(mod, args, kwargs=None, **kw):
    pure.mem.fill_(-1)
    pure.count.zero_()
    ep = _real_export(pure, args, kwargs, **kw)
    g = ep.graph
    ph = {n.name: n for n in g.nodes if n.op == "placeholder"}
    b_mem, b_count = ph["b_mem"], ph["b_count"]
    out = next(n for n in g.nodes if n.op == "output")
    # the nodes computing full and count_new: the operands of the final sums
    sums = [n for n in g.nodes if n.target == torch.ops.aten.sum.default]
    full_n, count_n = sums[-2].args[0], sums[-1].args[0]
    fm = b_mem.meta["val"].fake_mode
    with g.inserting_before(out):
        for buf, val in ((b_mem, full_n), (b_count, count_n)):
            sp = g.call_function(torch.ops.aten.unsafe_split.Tensor, (buf, buf.meta["val"].shape[0]))
            v = g.call_function(operator.getitem, (sp, 0))
            c = g.call_function(torch.ops.aten.copy_.default, (v, val))
            with fm:
                sp.meta["val"] = torch.ops.aten.unsafe_split.Tensor(buf.meta["val"], buf.meta["val"].shape[0])
                v.meta["val"] = sp.meta["val"][0]
                c.meta["val"] = v.meta["val"]
    g.lint()
    ep.graph_module.recompile()
    return ep


torch.export.export = _export
model.eval()
with autocast:
    val_bpb = evaluate_bpb(stateful, device)

