"""DAGER: exact inversion of one FedSGD gradient of a decoder transformer.

Petrov, Dimitrov, Balunovic, Vechev, "DAGER: Exact Gradient Inversion for Large
Language Models", NeurIPS 2024, https://arxiv.org/abs/2405.15586

Threat model: an honest-but-curious aggregator sees one party's gradient for one batch
and knows the weights it was computed at: the shared starting checkpoint at step 0, and
at later steps the same checkpoint with the broadcast mean gradients replayed through
the public optimizer (:class:`attacks.bag_of_tokens.StepWeights`).

Why it works.  For a linear layer ``y = W x`` the weight gradient is
``dL/dW = sum_t delta_t x_t^T``, so every input ``x_t`` that influences the loss lies in
the row space of ``dL/dW`` -- a proper subspace while batch x length < hidden size.

1. Layer 0.  The input of layer 0's q/k/v projections is ``RMSNorm(embedding(token))``:
   position-independent, because RoPE rotates *after* the projection.  Stacking the
   q, k and v gradients (each scaled to unit norm; the query of position 0 and the
   keys/values of the last position get zero gradient, the stack covers both) and
   keeping the right singular vectors above ``rank_tol`` x the largest singular value
   gives the span; every vocabulary token whose normalised embedding is within
   ``span_tol`` (relative residual) of it is a candidate.
2. Layer 1.  Its projection inputs depend on the whole prefix (causal attention), so
   sequences are grown token by token: every surviving prefix is extended by every
   candidate, and an extension survives when its layer-1 input at the new position lies
   in the span of layer 1's stacked gradient.  This runs to length L-1.  A one-layer
   model has no layer 1; any linear map after layer 0's attention serves the same
   purpose, so the check then uses layer 0's MLP input (gate/up projections; for a
   mixture of experts, whose experts see only some tokens, the attention output
   projection o_proj).  Echoes of the truth -- ``t t t ...`` has at every position the
   input the row starting with ``t`` has at position 0 -- also pass; the fewest prefixes
   whose inputs span the whole gradient are kept (:func:`select_rows`).
3. The last token of a row reaches no loss term through attention; it is the label of
   position L-2 and shows up in the LM-head gradient
   ``N dL/dW_head = (P - Y)^T H`` (softmax P, one-hot labels Y, final hidden states H,
   N label positions): with the prefixes known, everything but the last labels is
   computable, and the remainder's row v is the sum of ``h_{b,L-2}`` over rows b ending
   in v, solved by least squares against the known ``h_{b,L-2}`` (:func:`last_tokens`,
   which also finds rows that occur twice in the batch).

Tolerances.  Rank: float32 gradients put the noise singular values near 1e-7 of the
largest, genuine ones mostly above 1e-3 but down to ~1e-4 when a row repeats a token
(nearly collinear inputs) or ~1e-6 for positions reached only by a MoE router's
auxiliary loss; ``rank_tol`` 0 cuts at the widest gap of the spectrum below 1e-3
(:func:`numerical_rank`), a positive value cuts there instead.  Span: with the
rank right, true candidates have relative residuals below 2e-7 (float32); wrong ones are
about sqrt(1 - rank/hidden) -- 0.25 and up while batch x length <= 15/16 of the hidden
size -- except near-echoes in runs of a repeated token (``21 21 11`` against the true
``21 21 21 11``: ~1e-2), so ``span_tol`` = 1e-4 leaves margin both ways.  When the
rank reaches the hidden size the span check says nothing: the batch is skipped with a
note.

FedAvg.  After one local step of plain SGD a party's weight delta is ``-lr`` x its batch
gradient (:func:`attacks.bag_of_tokens.delta_scaling` scales it back), so the same
inversion applies -- except that the delta is a float32 difference of weights, whose
rounding divided by ``lr`` lifts the spectrum's noise floor to ~2e-4 at lr 3e-3 (~6e-6
at lr 0.1): the span tolerance becomes ``DELTA_FLOOR`` x that floor when larger, which
keeps recovery exact down to lr ~1e-3; near-echoes (~1e-2) come within reach below it.
With several local steps or Adam the delta is not one batch's gradient: the attack runs
anyway and its reconstructions carry the note.

    python -m attacks run runs/<fedsgd run> --attack dager
"""
import copy
import logging

import torch

from parties.models import is_moe

from .bag_of_tokens import GradientBatch, StepWeights, gradient_batches, param_name
from .base import FEDSGD_AGGREGATOR, Attack, Reconstruction

log = logging.getLogger(__name__)

# span tolerance for a FedAvg delta: this many times its spectrum's noise floor
DELTA_FLOOR = 30.0


class _Stop(Exception):
    """Raised by the capture hook so the forward pass ends at the layer of interest."""


def attacker_copy(model):
    """A float64 eval-mode copy of ``model`` for the span checks (float64 keeps the
    recomputed inputs far more exact than the float32 gradient's own noise); MoE experts
    switch to the eager loop, as grouped matmuls take no float64."""
    model = copy.deepcopy(model).double().eval()
    if hasattr(model, "set_experts_implementation") and is_moe(model):
        model.set_experts_implementation("eager")
    return model


def token_probe(model):
    """Linear maps whose common input is position-independent: layer 0's q/k/v."""
    attn = model.model.layers[0].self_attn
    return [attn.q_proj, attn.k_proj, attn.v_proj]


def sequence_probe(model):
    """Linear maps whose common input depends on the prefix: layer 1's q/k/v, else (one
    layer) layer 0's dense MLP gate/up, else layer 0's o_proj."""
    layers = model.model.layers
    if len(layers) > 1:
        attn = layers[1].self_attn
        return [attn.q_proj, attn.k_proj, attn.v_proj]
    mlp = layers[0].mlp
    if isinstance(getattr(mlp, "gate_proj", None), torch.nn.Linear) and \
            isinstance(getattr(mlp, "up_proj", None), torch.nn.Linear):
        return [mlp.gate_proj, mlp.up_proj]
    return [layers[0].self_attn.o_proj]


def probe_inputs(model, probe, input_ids):
    """The input of ``probe``'s modules for ``input_ids`` [n, len] -> [n, len, d]; the
    forward pass stops there."""
    proj = probe[0]
    seen = {}

    def hook(_module, args):
        seen["x"] = args[0].detach()
        raise _Stop

    handle = proj.register_forward_pre_hook(hook)
    try:
        with torch.no_grad():
            model(input_ids=input_ids)
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen["x"]


def numerical_rank(s, rank_tol=0.0):
    """How many singular values ``s`` (descending) are signal, not float noise.

    ``rank_tol`` > 0: those above ``rank_tol`` x the largest.  0 (auto): cut at the widest
    gap of the log-spectrum among values below 1e-3 of the largest, if it spans at least
    a decade; else everything is signal.  Float32 noise sits near 1e-7; genuine values
    reach down to ~1e-4 when a row repeats a token (nearly collinear inputs) and to ~1e-6
    for positions whose only gradient is a MoE router's auxiliary loss, so no fixed
    cut fits every case while the gap to the noise stays wide."""
    s = s / s[0]
    if rank_tol > 0:
        return int((s > rank_tol).sum())
    logs = torch.log10(s.clamp_min(1e-300))
    gaps = logs[:-1] - logs[1:]
    gaps[s[1:] >= 1e-3] = 0
    if len(gaps) == 0 or gaps.max() < 1:
        return len(s)
    return int(gaps.argmax()) + 1


def span_basis(batch: GradientBatch, model, probe, rank_tol, floor=False):
    """Orthonormal basis [d, r] of the row space of the probe's stacked weight gradients;
    with ``floor`` also the noise floor: the largest singular value cut, relative to the
    largest kept (0 when none is cut)."""
    blocks = []
    for module in probe:
        g = batch.get(param_name(model, module.weight)).double()
        if g.norm() > 0:
            blocks.append(g / g.norm())
    if not blocks:
        return None
    _, s, vh = torch.linalg.svd(torch.cat(blocks), full_matrices=False)
    rank = numerical_rank(s, rank_tol)
    if floor:
        return vh[:rank].T, float(s[rank] / s[0]) if rank < len(s) else 0.0
    return vh[:rank].T


def residual(x, basis):
    """Relative distance of each row of ``x`` [n, d] from span(``basis``)."""
    x = x.double()
    norm = x.norm(dim=-1)
    res = (x - (x @ basis) @ basis.T).norm(dim=-1) / norm.clamp_min(1e-30)
    # The zero vector (e.g. an all-zero padding embedding) lies in every span: no evidence.
    return torch.where(norm > 0, res, torch.ones_like(res))


def grow_prefixes(model, probe, candidates, basis1, span_tol, length, beam):
    """Greedy DAGER extension to ``length`` tokens; returns the surviving prefixes, each
    with its worst residual. Stops early when no extension passes."""
    cand = torch.tensor(candidates, dtype=torch.long)
    prefixes = [([], 0.0)]
    for pos in range(length):
        base = torch.tensor([p for p, _ in prefixes], dtype=torch.long).reshape(len(prefixes), pos)
        ids = torch.cat([base.repeat_interleave(len(cand), 0), cand.repeat(len(prefixes)).unsqueeze(1)], 1)
        res = residual(probe_inputs(model, probe, ids)[:, -1], basis1)
        ok = torch.nonzero(res < span_tol).flatten().tolist()
        if not ok:
            break
        ok.sort(key=lambda i: float(res[i]))
        prefixes = [(ids[i].tolist(), max(prefixes[i // len(cand)][1], float(res[i]))) for i in ok[:beam]]
    return prefixes


def select_rows(model, probe, prefixes, rank, tol=1e-3):
    """The fewest prefixes whose sequence-probe inputs span the probe gradient's row space.

    Every surviving prefix lies in the span, but some carry no evidence: a run of one
    repeated token ``t t t ...`` has the same probe input at every position (attention
    over identical values returns that value, whatever the weights) as the true row
    starting with ``t`` has at position 0.  True rows each add about one dimension per
    position, so picking greedily by new dimensions until the gradient's ``rank`` is
    covered keeps them and drops the echoes."""
    ids = torch.tensor([p for p, _ in prefixes], dtype=torch.long)
    x = probe_inputs(model, probe, ids).double()
    x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    basis = torch.zeros(x.shape[-1], 0, dtype=x.dtype)
    chosen, left = [], list(range(len(prefixes)))

    def new_dims(i):
        r = x[i] - (x[i] @ basis) @ basis.T
        return int((torch.linalg.svdvals(r) > tol).sum())

    while left and basis.shape[1] < rank:
        gains = [new_dims(i) for i in left]
        best = max(range(len(left)), key=lambda k: (gains[k], -k))
        if gains[best] == 0:
            break
        i = left.pop(best)
        chosen.append(i)
        q, s, _ = torch.linalg.svd(torch.cat([basis, x[i].T], 1), full_matrices=False)
        basis = q[:, : int((s > tol * s[0]).sum())]
    return [prefixes[i] for i in sorted(chosen)]


def last_tokens(model, batch, prefixes, rows):
    """The final token and the multiplicity of each row, from the LM-head gradient G.

    With cross-entropy averaged over the N = rows x (L-1) label positions,
    ``N G = sum_b (P_b - Y_b)^T H_b`` (module docstring, step 3).  Per distinct prefix b
    the part ``K_b`` without its unknown last label is computable, so ``G ~ sum_b a_b K_b``
    is fitted by least squares (the few rows of unknown labels are outliers: fitted once,
    the 2B worst rows dropped, refitted).  The residual row v is ``-sum a_b h_b`` over the
    b whose last label is v; ``a_b`` is proportional to how often the row occurs in the
    batch (a batch can hold the same row twice), scaled by ``rows``, the public batch size.
    -> (last token per prefix, multiplicity per prefix)."""
    head = model.get_output_embeddings()
    g = batch.get(param_name(model, head.weight)).double()
    ids = torch.tensor(prefixes, dtype=torch.long)
    seen = {}
    handle = head.register_forward_pre_hook(lambda _m, args: seen.__setitem__("h", args[0].detach()))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids).logits.double()
    finally:
        handle.remove()
    h = seen["h"].double()                                     # [B, n, d]
    p = torch.softmax(logits, -1)                              # [B, n, V]
    B, n = ids.shape
    k = torch.einsum("btv,btd->bvd", p, h)                     # [B, V, d]
    if n > 1:
        k.index_put_((torch.arange(B).repeat_interleave(n - 1), ids[:, 1:].reshape(-1)),
                     -h[:, :-1].reshape(-1, h.shape[-1]), accumulate=True)
    keep = torch.arange(g.shape[0])
    for _ in range(2):
        design = k[:, keep].reshape(B, -1).T                   # [rows*d, B]
        a = torch.linalg.lstsq(design, g[keep].reshape(-1, 1)).solution.flatten()
        r = g - torch.einsum("b,bvd->vd", a, k)                # row v = -sum a_b h_b, b ending in v
        keep = r.norm(dim=1).argsort()[: max(1, g.shape[0] - 2 * B)]
    coef = -r @ torch.linalg.pinv(h[:, -1])                    # [V, B]
    counts = (a * n * rows).round().clamp_min(1).long()
    return coef.argmax(0).tolist(), counts.tolist()


class Dager(Attack):
    """Exact span-check inversion of FedSGD gradients (Petrov et al., NeurIPS 2024)."""

    name = "dager"
    threat_model = FEDSGD_AGGREGATOR
    targets = {"fedsgd": ("grad",), "fedavg": ("delta",)}
    replays = {"fedsgd": ("update",), "fedavg": ("update",)}  # StepWeights rebuilds each step's weights
    options = {"rank_tol": 0.0, "span_tol": 1e-4, "beam": 64, "length": 0,
               "steps": None, "max_batches": 0, "aggregate": False}

    def run(self, view, rank_tol=0.0, span_tol=1e-4, beam=64, length=0, steps=None, max_batches=0,
            aggregate=False):
        """``length``: tokens per row (0: ``training.seq_len`` from the public config);
        ``steps``: which steps to attack (None: all whose weights the observer can
        rebuild); ``beam``: most prefixes kept per position; ``aggregate``: invert the
        broadcast mean gradient of each round (one batch of every selected party's rows --
        what secure aggregation leaves the coordinator) instead of each party's gradient."""
        cfg = view.config()["training"]
        length = length or cfg["seq_len"]
        weights = StepWeights(view)
        out = []
        for b in sorted(gradient_batches(view, self.kinds(view.protocol), steps, max_batches, aggregate),
                        key=lambda b: b.step):
            model = weights.at(b.step)
            if model is None:
                seqs, note = [], f"weights at step {b.step} unknown (an earlier update was not observed)"
            else:
                seqs, note = self.invert(b, attacker_copy(model), rank_tol, span_tol,
                                         beam, length, b.rows or cfg["batch_size"])
            if note:
                log.info("dager %s step %s: %s", b.party, b.step, note)
                out.append(Reconstruction(b.protocol, b.party, b.step, [],
                                          meta={"note": f"{b.note}; {note}" if b.note else note}))
            for ids, worst in seqs:
                meta = {"max_residual": worst, **({"note": b.note} if b.note else {})}
                out.append(Reconstruction(b.protocol, b.party, b.step, ids, meta=meta))
        return out

    @staticmethod
    def invert(batch, model, rank_tol, span_tol, beam, length, rows):
        """-> ([(token ids, worst residual)], note or None) for one gradient batch, with
        ``model`` at the weights the gradient was taken at."""
        hidden = model.config.hidden_size
        probes = [token_probe(model), sequence_probe(model)]
        found = [span_basis(batch, model, probe, rank_tol, floor=True) for probe in probes]
        if any(f is None for f in found):
            return [], "zero gradient"
        bases = [basis for basis, _ in found]
        # A FedAvg delta is a float32 difference of weights: its rounding, divided by lr,
        # lifts the noise floor of the spectrum far above a gradient's (~3e-4 at lr 3e-3);
        # true inputs then sit up to a few times the floor off the span, wrong ones ~0.25+.
        tols = [max(span_tol, DELTA_FLOOR * fl) if batch.scale != 1.0 else span_tol for _, fl in found]
        if max(b.shape[1] for b in bases) >= hidden:
            return [], (f"gradient rank reached the hidden size {hidden}: batch x length too large "
                        "for the span check")
        vocab = model.get_input_embeddings().weight.shape[0]
        x0 = probe_inputs(model, probes[0], torch.arange(vocab).unsqueeze(1))[:, 0]
        candidates = torch.nonzero(residual(x0, bases[0]) < tols[0]).flatten().tolist()
        if not candidates:
            return [], "no vocabulary token lies in the layer-0 span"
        prefixes = grow_prefixes(model, probes[1], candidates, bases[1], tols[1], length - 1, beam)
        prefixes = [(p, r) for p, r in prefixes if p]
        if not prefixes:
            return [], "no prefix survived the sequence span check"
        prefixes = select_rows(model, probes[1], prefixes, bases[1].shape[1])
        if len(prefixes[0][0]) == length - 1:
            finals, counts = last_tokens(model, batch, [p for p, _ in prefixes], rows)
            prefixes = [(p + [t], r) for (p, r), t, c in zip(prefixes, finals, counts) for _ in range(c)]
        return prefixes, None


ATTACK = Dager
