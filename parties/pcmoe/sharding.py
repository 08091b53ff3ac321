"""Expert sharding for PC-MoE: which party hosts which expert, and the shard module.

PC-MoE (Zhang, Ding, Low 2025, https://arxiv.org/abs/2506.02965) splits the experts of
every MoE layer round-robin over the ``n`` parties: party ``i`` hosts the experts
``{e : e mod n = i}``.  :func:`shard_model` replaces each MoE layer's ``mlp.experts``
(transformers 5.x stores them as 3D tensors ``gate_up_proj [E, 2I, H]`` and
``down_proj [E, H, I]``) with an :class:`ExpertShard` holding copies of the hosted
slices only, so the full tensors are freed and the memory tracker sees the saving.

:func:`route` turns a router's top-k choice into a per-expert plan in the same order
the transformers eager implementation visits experts, so combining local and remote
expert outputs reproduces the unsplit layer.
"""
import logging

import torch
import torch.nn.functional as F
from torch import nn

from testbed.errors import ConfigError

log = logging.getLogger(__name__)


def moe_blocks(model):
    """``[(layer index, decoder layer)]`` of every decoder layer whose ``mlp`` is a
    sparse MoE block (a ``gate`` router and ``experts`` with 3D weight tensors)."""
    out = []
    for idx, layer in enumerate(model.model.layers):
        mlp = getattr(layer, "mlp", None)
        experts = getattr(mlp, "experts", None)
        if getattr(mlp, "gate", None) is not None and experts is not None \
                and (hasattr(experts, "gate_up_proj") or isinstance(experts, ExpertShard)):
            out.append((idx, layer))
    return out


def check_moe(model, family=""):
    """Raise ConfigError unless every decoder layer is a splittable MoE layer."""
    blocks = moe_blocks(model)
    n_layers = len(model.model.layers)
    if len(blocks) != n_layers:
        raise ConfigError("model.family", [
            f"pcmoe needs a mixture-of-experts model with an MoE block in every layer "
            f"(family {family or model.config.model_type!r} has {len(blocks)} of {n_layers}); "
            "use mixtral, olmoe or qwen2_moe"])
    experts = blocks[0][1].mlp.experts
    problems = []
    for attr, want in (("is_transposed", False), ("has_bias", False), ("is_concatenated", True)):
        if getattr(experts, attr, want) != want:
            problems.append(f"experts.{attr} is {getattr(experts, attr)!r}; pcmoe supports {want!r}")
    if problems:
        raise ConfigError("model.family", problems)
    return blocks


def hosted_experts(num_experts, party, n_parties):
    """Round-robin assignment: the experts party ``party`` hosts, in increasing order."""
    return [e for e in range(num_experts) if e % n_parties == party]


def host_of(expert, n_parties):
    return expert % n_parties


class ExpertShard(nn.Module):
    """The experts one party hosts in one MoE layer.

    ``gate_up_proj`` is ``[len(hosted), 2I, H]`` and ``down_proj`` ``[len(hosted), H, I]``:
    owned copies of the hosted rows of the original 3D tensors.  ``forward(e, x)`` runs
    global expert ``e`` on rows ``x [T, H]`` exactly like the eager transformers
    implementation (SwiGLU: ``down(act(gate(x)) * up(x))``) and returns ``[T, H]``.
    """

    def __init__(self, experts, hosted):
        super().__init__()
        self.hosted = list(hosted)
        self.num_experts = experts.gate_up_proj.shape[0]
        idx = torch.tensor(self.hosted, dtype=torch.long)
        self.gate_up_proj = nn.Parameter(experts.gate_up_proj.detach()[idx].clone())
        self.down_proj = nn.Parameter(experts.down_proj.detach()[idx].clone())
        self.act_fn = experts.act_fn
        self._slot = {e: k for k, e in enumerate(self.hosted)}

    def hosts(self, expert):
        return expert in self._slot

    def forward(self, expert, x):
        k = self._slot[expert]
        gate, up = F.linear(x, self.gate_up_proj[k]).chunk(2, dim=-1)
        return F.linear(self.act_fn(gate) * up, self.down_proj[k])

    def grouped(self, experts, counts, x):
        """Several hosted experts in one call: rows ``x [sum(counts), H]`` hold
        ``counts[i]`` rows for ``experts[i]``, in that order; returns ``[sum(counts), H]``,
        what :meth:`forward` gives block by block.  One grouped matrix product per
        projection (as transformers' ``grouped_mm`` experts do) instead of a Python loop
        over experts."""
        slots = [self._slot[e] for e in experts]
        if not _GROUPED or not _aligned(x, self.gate_up_proj, self.down_proj) \
                or any(b <= a for a, b in zip(slots, slots[1:])):
            return torch.cat([self(e, xe) for e, xe in zip(experts, torch.split(x, list(counts)))]) \
                if experts else x.new_zeros(0, self.down_proj.shape[1])
        # every hosted expert is a group (zero rows for those not asked for): no weight copy
        per_slot = [0] * len(self.hosted)
        for k, c in zip(slots, counts):
            per_slot[k] = int(c)
        offs = torch.tensor(per_slot, dtype=torch.int32, device=x.device).cumsum(0, dtype=torch.int32)
        h = _GROUPED(x.contiguous(), self.gate_up_proj.transpose(-2, -1), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return _GROUPED((self.act_fn(gate) * up).contiguous(), self.down_proj.transpose(-2, -1), offs=offs)

    def extra_repr(self):
        return f"hosted={self.hosted} of {self.num_experts}"


_GROUPED = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _aligned(x, *weights):
    """The grouped kernel wants every row stride a multiple of 16 bytes."""
    return all(w.shape[-1] * w.element_size() % 16 == 0 and w.shape[-2] * w.element_size() % 16 == 0
               for w in weights) and x.shape[-1] * x.element_size() % 16 == 0


def shard_model(model, party, n_parties):
    """Replace every MoE layer's experts by the shard ``party`` hosts (in place).

    Returns ``{layer index: ExpertShard}``.  The rest of the model -- embeddings,
    attention, norms, routers, LM head -- stays whole: that is the party's backbone.
    """
    shards = {}
    for idx, layer in check_moe(model):
        experts = layer.mlp.experts
        hosted = hosted_experts(experts.gate_up_proj.shape[0], party, n_parties)
        layer.mlp.experts = shards[idx] = ExpertShard(experts, hosted)
    if shards and not next(iter(shards.values())).hosted:
        log.warning("party-%d hosts no experts: %d parties share %d experts per layer", party,
                    n_parties, next(iter(shards.values())).num_experts)
    return shards


def route(top_k_index, num_experts):
    """``[(expert, token_idx, top_k_pos)]`` for every expert that got tokens.

    Same order and same row order as ``MixtralExperts.forward`` (one-hot mask permuted
    to ``[E, k, T]``, then ``torch.where``), so sums of expert outputs match the eager
    implementation term by term.
    """
    mask = F.one_hot(top_k_index, num_classes=num_experts).permute(2, 1, 0)
    plan = []
    for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
        top_k_pos, token_idx = torch.where(mask[e])
        plan.append((e, token_idx, top_k_pos))
    return plan
