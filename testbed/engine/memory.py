"""Peak accelerator memory per party, split into params / grads / optimizer / activations.

On CPU the tracker counts live tensor storage: parameters, their ``.grad``, the
optimizer's state tensors, and -- for activations -- every tensor autograd saves for
backward during a forward pass (``torch.autograd.graph.saved_tensors_hooks``), de-
duplicated by storage and excluding parameters.  On CUDA it also reads the caching
allocator's own peak counter (``torch.cuda.max_memory_allocated``) around the role's
work, and the container engine caps each party process with
``torch.cuda.set_per_process_memory_fraction``.

A party whose peak goes over its budget raises :class:`~testbed.errors.BudgetExceeded`
naming the party, the budget and the peak -- or logs a warning with ``on_exceed: warn``.
"""
import contextlib
import logging

import torch

from testbed.errors import BudgetExceeded, fmt_bytes

log = logging.getLogger(__name__)


def _storage_key(t):
    try:
        s = t.untyped_storage()
        return s.data_ptr(), s.nbytes()
    except (RuntimeError, NotImplementedError):  # meta / sparse tensors have no storage
        return id(t), t.numel() * t.element_size()


def unique_bytes(tensors):
    seen = {}
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        k = _storage_key(t)
        seen[k[0]] = k[1]
    return sum(seen.values())


def optimizer_state_tensors(opt):
    if opt is None:
        return []
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


class MemoryTracker:
    """Tracks one party's memory. ``budget`` in bytes or None; ``on_exceed`` error|warn."""

    def __init__(self, party, budget=None, on_exceed="error"):
        self.party, self.budget, self.on_exceed = party, budget, on_exceed
        self.params = self.grads = self.optimizer = self.activations = 0
        self.peak = 0
        self.cuda_peak = 0
        self._warned = False
        self._modules, self._opts, self._params = [], [], []

    def attach(self, modules=(), optimizers=()):
        """Register the modules/optimizers whose state this party holds."""
        self._modules = [m for m in modules if m is not None]
        self._opts = [o for o in optimizers if o is not None]
        # walked once: update_state runs after every optimizer step
        self._params = [p for m in self._modules for p in m.parameters()]
        self.update_state()

    def _tensors(self, kind):
        if kind == "params":
            return list(self._params)
        if kind == "grads":
            # Opacus (DP-SGD) keeps one gradient per example in p.grad_sample: count it too
            return [g for p in self._params
                    for g in (p.grad, getattr(p, "grad_sample", None)) if isinstance(g, torch.Tensor)]
        return [t for o in self._opts for t in optimizer_state_tensors(o)]

    def update_state(self):
        """Re-measure params, grads and optimizer state (call after optimizer.step)."""
        self.params = max(self.params, unique_bytes(self._tensors("params")))
        self.grads = max(self.grads, unique_bytes(self._tensors("grads")))
        self.optimizer = max(self.optimizer, unique_bytes(self._tensors("opt")))
        self._check()

    @contextlib.contextmanager
    def activations_scope(self):
        """Count the bytes autograd saves for backward inside this block."""
        param_ptrs = {_storage_key(p)[0] for p in self._tensors("params")}
        saved = {}

        def pack(t):
            k = _storage_key(t)
            if k[0] not in param_ptrs:
                saved[k[0]] = k[1]
            return t

        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.activations = max(self.activations, sum(saved.values()))
        if cuda:
            self.cuda_peak = max(self.cuda_peak, torch.cuda.max_memory_allocated() - base)
        self._check()

    def add_activations(self, nbytes):
        """For roles that hold activations outside autograd (e.g. buffered for a remote backward)."""
        self.activations = max(self.activations, nbytes)
        self._check()

    def _check(self):
        self.peak = max(self.peak, self.params + self.grads + self.optimizer + self.activations)
        if self.budget is not None and self.peak > self.budget:
            if self.on_exceed == "error":
                raise BudgetExceeded(self.party, self.budget, self.peak, self.breakdown_text())
            if not self._warned:
                log.warning("%s: peak %s exceeds budget %s (%s)", self.party, fmt_bytes(self.peak),
                            fmt_bytes(self.budget), self.breakdown_text())
                self._warned = True

    def breakdown_text(self):
        return (f"params {fmt_bytes(self.params)}, grads {fmt_bytes(self.grads)}, optimizer "
                f"{fmt_bytes(self.optimizer)}, activations {fmt_bytes(self.activations)}")

    def summary(self):
        out = {"party": self.party, "params": self.params, "grads": self.grads,
               "optimizer": self.optimizer, "activations": self.activations, "peak": self.peak,
               "budget": self.budget}
        if self.cuda_peak:
            out["cuda_peak"] = self.cuda_peak
        return out
