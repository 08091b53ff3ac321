"""DP-SGD for whatever a party trains locally, through Opacus.

DP-SGD (Abadi et al. 2016, https://arxiv.org/abs/1607.00133): clip every example's
gradient to L2 norm ``max_grad_norm``, sum, add N(0, (noise_multiplier x max_grad_norm)^2)
and divide by the batch size.  A scenario asks for it with::

    defences: [{type: dp_sgd, noise_multiplier: 1.0, max_grad_norm: 1.0, delta: 1.0e-5}]

A protocol calls :func:`dp_config` (the entry, or None) and, if set, :func:`make_private`
on the modules and optimizer it trains, then uses the returned :class:`PrivateTraining`
instead of the plain optimizer.  Per-sample gradients come from Opacus'
``GradSampleModule`` in ``hooks`` mode: ``nn.Linear`` / ``nn.Embedding`` have exact rules,
and single-input layers without one (the HF ``*RMSNorm`` classes) use Opacus' functorch
fallback -- verified on a tiny ``LlamaForCausalLM`` (mean of per-sample gradients equals
the batch gradient to 1e-8).  ``grad_sample_mode="ew"`` does not work with HF models
(its forward takes one positional input).  MoE routers and expert modules are refused
with an error naming each layer: their forward flattens the batch into tokens (and the
experts take three inputs with 3-D weights), so Opacus cannot attribute a gradient to an
example.

Privacy accounting: an RDP accountant (Mironov 2017) per party, stepped once per private
optimizer step with sample rate ``q = batch_size / data_size``.  Batches are drawn with
replacement rather than by Poisson sampling, so the reported epsilon is the usual
approximation made by DP-SGD implementations with fixed-size batches.  The privacy unit
is one training row of one party (example-level DP); client sampling is not credited.
"""
import logging
import warnings

from opacus import GradSampleModule
from opacus.accountants import RDPAccountant
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator

from testbed.errors import ConfigError

log = logging.getLogger(__name__)

# The embedding's input (token ids) never requires grad, so PyTorch warns on every backward
# that Opacus' full backward hook fires on outputs only; that is exactly what Opacus needs.
warnings.filterwarnings("ignore", message="Full backward hook is firing when gradients are computed")


def dp_config(ctx):
    """The scenario's ``dp_sgd`` defence for the protocol under study, or None.

    Baselines (``centralized``, ``local``) always run without it: they are the non-private
    reference points.  Raises ConfigError if more than one dp_sgd entry is given.
    """
    entries = [(i, d) for i, d in enumerate(ctx.scenario.defences) if d.type == "dp_sgd"]
    if len(entries) > 1:
        raise ConfigError("defences", [f"only one dp_sgd entry is allowed (got {len(entries)}: "
                                       f"indices {[i for i, _ in entries]})"])
    if not entries or ctx.protocol_name != ctx.scenario.protocol.name:
        return None
    return entries[0][1]


def unsupported_layers(module):
    """Names and reasons of the layers Opacus cannot compute per-sample gradients for."""
    problems = [str(e) for e in ModuleValidator.validate(module, strict=False)]
    for name, m in module.named_modules():
        own = [(n, p) for n, p in m.named_parameters(recurse=False) if p.requires_grad]
        if not own or type(m) in GradSampleModule.GRAD_SAMPLERS:
            continue
        cls = type(m).__name__
        if cls.endswith("RMSNorm") and all(p.dim() == 1 for _, p in own):
            continue  # one input, per-token scale: Opacus' functorch fallback is exact
        shapes = ", ".join(f"{n} {list(p.shape)}" for n, p in own)
        if cls.endswith("Experts") or any(p.dim() >= 3 for _, p in own):
            why = "MoE experts with 3-D weights, fed tokens flattened across the batch"
        elif cls.endswith("Router"):
            why = "MoE router, fed tokens flattened across the batch"
        else:
            why = "no per-sample gradient rule in Opacus and not a known single-input layer"
        problems.append(f"layer {name!r} ({cls}: {shapes}): {why}")
    return problems


class PrivateTraining:
    """A party's private optimizer, its per-sample-gradient modules and its accountant.

    ``step()`` is DP-SGD's step (clip, noise, average, update) and advances the accountant.
    ``privatize()`` does only the clip + noise + average into ``p.grad`` (FedSGD sends that
    gradient; the update is applied later with ``apply()`` on the averaged one).
    """

    def __init__(self, modules, optimizer, cfg, sample_rate):
        self.cfg, self.sample_rate = cfg, sample_rate
        self.modules = modules
        self.optimizer = optimizer
        self.accountant = RDPAccountant()

    def _account(self):
        self.accountant.step(noise_multiplier=self.cfg.noise_multiplier, sample_rate=self.sample_rate)

    def step(self):
        """DP-SGD step on the current per-sample gradients."""
        self.optimizer.step()
        self._account()

    def privatize(self):
        """Clip per-sample gradients, sum, add noise, divide by the batch: result in ``p.grad``."""
        self.optimizer.pre_step()
        self._account()

    def apply(self):
        """The wrapped optimizer's update with whatever ``p.grad`` now holds (no clipping)."""
        self.optimizer.original_optimizer.step()

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)

    @property
    def steps(self):
        return sum(n for _, _, n in self.accountant.history)

    def epsilon(self):
        """Privacy spent so far at the configured delta (0 before the first step)."""
        if not self.accountant.history:
            return 0.0
        if self.cfg.noise_multiplier == 0:
            return float("inf")
        return float(self.accountant.get_epsilon(delta=self.cfg.delta))

    def log_fields(self):
        """The fields a train Log record carries under DP-SGD."""
        eps = self.epsilon()
        # JSON has no infinity: with noise_multiplier 0 there is no privacy, logged as null
        return {"epsilon": eps if eps != float("inf") else None,
                "noise_multiplier": self.cfg.noise_multiplier,
                "max_grad_norm": self.cfg.max_grad_norm, "delta": self.cfg.delta}


def make_private(modules, optimizer, data_size, batch_size, cfg, generator=None):
    """Wrap ``modules`` (one or a list) and ``optimizer`` for DP-SGD.

    ``data_size``: the party's number of training rows; ``batch_size``: rows per step
    (the sample rate is their ratio).  ``generator``: a torch.Generator for the noise.
    Hooks are added to the modules in place (call them as before); the returned
    :class:`PrivateTraining` replaces the optimizer.  Raises ConfigError naming every
    layer Opacus cannot handle.
    """
    modules = list(modules) if isinstance(modules, (list, tuple)) else [modules]
    problems = [f"dp_sgd: {p}" for m in modules for p in unsupported_layers(m)]
    if problems:
        raise ConfigError("defences", problems)
    if not 0 < batch_size <= data_size:
        raise ValueError(f"make_private: batch_size {batch_size} must be in 1..data_size ({data_size})")
    gsms = [GradSampleModule(m, batch_first=True, loss_reduction="mean", strict=False) for m in modules]
    dp_opt = DPOptimizer(optimizer, noise_multiplier=cfg.noise_multiplier,
                         max_grad_norm=cfg.max_grad_norm, expected_batch_size=batch_size,
                         loss_reduction="mean", generator=generator)
    log.debug("dp_sgd: sigma=%s C=%s q=%s", cfg.noise_multiplier, cfg.max_grad_norm,
              batch_size / data_size)
    return PrivateTraining(gsms, dp_opt, cfg, batch_size / data_size)

