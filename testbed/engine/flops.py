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
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry, register_flop_formula


def _grouped_mm_flops(a_shape, b_shape, *args, out_shape=None, **kwargs):
    """torch has no formula for the grouped matrix product that MoE experts run (PC-MoE's
    hosts, transformers' grouped experts): 2 x (rows) x (inner) x (cols), summed over groups.
    2D x 3D -> 2D ([M, K] x [G, K, N]), 2D x 2D -> 3D ([K, M] x [M, N], the weight gradient),
    3D x 3D -> 3D (batched)."""
    if len(a_shape) == 2 and len(b_shape) == 3:
        return 2 * a_shape[0] * a_shape[1] * b_shape[2]
    if len(a_shape) == 2 and len(b_shape) == 2:
        return 2 * a_shape[0] * a_shape[1] * b_shape[1]
    if len(a_shape) == 3 and len(b_shape) == 2:      # [G, M, K] x [K, N]... per group
        return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[1]
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[-1]


_GROUPED = getattr(torch.ops.aten, "_grouped_mm", None)
if _GROUPED is not None and _GROUPED not in flop_registry:
    register_flop_formula(_GROUPED, get_raw=False)(
        lambda a_shape, b_shape, *args, out_shape=None, **kw: _grouped_mm_flops(a_shape, b_shape))


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
