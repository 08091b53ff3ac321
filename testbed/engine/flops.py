"""A lean FLOP counter for the ``flops`` compute mode.

``torch.utils.flop_counter.FlopCounterMode`` also tracks which module every op ran in
(global module hooks and a parent stack on every op), which the engine does not need
and which costs more than the counting.  :class:`FlopCount` is the same count -- the
same formula registry, so the totals are identical -- without the module tracking::

    with FlopCount() as fc:
        loss = model(ids, labels=ids).loss
        loss.backward()
    fc.total   # FLOPs of forward and backward
"""
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry


class FlopCount(TorchDispatchMode):
    """Sums the FLOPs of every op with a formula in torch's flop registry."""

    def __init__(self):
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.total += formula(*args, **kwargs, out_val=out)
        return out

    def get_total_flops(self):
        return self.total
