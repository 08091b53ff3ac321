"""Activation bytes for roles whose forward pass is cut into pieces by network waits.

``MemoryTracker.activations_scope`` measures one uninterrupted block.  A PC-MoE party
runs its forward layer by layer and yields to the engine between layers (to send
hidden states and wait for expert outputs); autograd's ``saved_tensors_hooks`` are
process-wide state, so a hook left installed across a yield would count other roles'
tensors.  :class:`SavedBytes` therefore installs its hook only inside each piece and
accumulates the storages saved for backward across pieces (de-duplicated by storage,
parameters excluded, as the tracker does), until :meth:`reset` at the end of a step.
The role reports the total with ``tracker.add_activations``.
"""
import contextlib

import torch


def _storage(t):
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):  # meta / sparse tensors have no storage
        return id(t), t.numel() * t.element_size()


class SavedBytes:
    """Bytes autograd keeps for backward, summed over several ``scope()`` blocks."""

    def __init__(self, modules):
        self._modules = list(modules)
        self._saved = {}
        self._params = None

    def _param_ptrs(self):
        # Parameters keep their storage for the whole run (optimizers update in place).
        if self._params is None:
            self._params = {_storage(p)[0] for m in self._modules for p in m.parameters()}
        return self._params

    @contextlib.contextmanager
    def scope(self):
        """Count what autograd saves inside this block (no yield may happen inside)."""
        params = self._param_ptrs()

        def pack(t):
            ptr, nbytes = _storage(t)
            if ptr not in params:
                self._saved[ptr] = nbytes
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield

    @property
    def total(self):
        return sum(self._saved.values())

    def reset(self):
        self._saved = {}
