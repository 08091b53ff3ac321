"""How the rows of one (layer, host) expert message are laid out on the wire.

The owner sends each remote host, per MoE layer, the hidden states of the tokens routed to
that host's experts.  By default the message holds one row per (token, expert) pair,
grouped by expert and, inside an expert's block, in the order the router's plan visits
them (by top-k rank, then by token position).  The hiding options of PC-MoE change what
the host can read from that layout; none changes the math:

* ``shuffle_rows`` -- the rows are permuted with the owner's private generator (inside
  each expert's block without ``dedup_rows``; over the whole message with it), so the
  order no longer gives the tokens' relative positions (nor the top-k rank);
* ``dedup_rows`` -- one row per (token, host): a token routed to several experts of the
  host is sent once, and an int32 tensor ``row_index`` names, for every (token, expert)
  pair, grouped by expert as ``counts`` says, the row it uses (pairs inside a block in
  row order).  The host returns one output per pair; the gradient it returns per row
  sums the pairs';
* ``pad_counts: N`` -- every expert's pair count is padded up to a multiple of ``N``
  with dummy rows the host cannot tell from the owner's metadata: Gaussian rows with the
  per-feature mean and std of the layer's real expert inputs, drawn from the owner's
  private generator.  The host computes on them; the owner drops their outputs and
  sends zero gradients for them (without ``shuffle_rows`` they sit at the end of each
  block, where their place gives them away).

:class:`Layout` keeps, for the owner only, which token every row carries (``-1``: a
dummy row) and where each real pair's output lies in the reply, so the owner can put the
outputs back in plan order and scatter the returned gradients to their tokens.
"""
from dataclasses import dataclass

import torch


@dataclass
class Layout:
    """One (layer, host) message's rows, as the owner knows them.

    ``experts``/``counts``: the meta the host gets (pairs per expert, padded);
    ``row_tokens``: long [rows] -- the flat token index each ``hidden`` row carries, -1 for
    a dummy row; ``row_index``: long [sum(counts)] -- the row of each pair (``None``: pair
    ``i`` is row ``i``); ``take``: long [real pairs] -- the reply position of each real
    (expert, token) pair, in plan order; ``plan_counts``: real pairs per expert."""

    experts: list
    counts: list
    row_tokens: torch.Tensor
    row_index: torch.Tensor
    take: torch.Tensor
    plan_counts: list

    @property
    def dummy(self):
        return self.row_tokens < 0


def _perm(n, gen):
    return torch.randperm(n, generator=gen).tolist() if gen is not None else list(range(n))


def _padding(count, multiple):
    return (-count) % multiple if multiple else 0


class WireLayout:
    """The owner's layout of its expert messages, from the protocol options.

    ``shuffle_gen``/``pad_gen``: the owner's private generators (row permutations, dummy
    row values); ``None`` for an option that is off."""

    def __init__(self, shuffle_rows=False, dedup_rows=False, pad_counts=0, shuffle_gen=None, pad_gen=None):
        self.dedup, self.pad = dedup_rows, int(pad_counts)
        self.shuffle_gen = shuffle_gen if shuffle_rows else None
        self.pad_gen = pad_gen

    def plain(self):
        return self.shuffle_gen is None and not self.dedup and not self.pad

    def lay_out(self, blocks):
        """``blocks``: ``[(expert, token_idx)]`` of one host, in plan order -> :class:`Layout`."""
        return self._dedup(blocks) if self.dedup else self._per_pair(blocks)

    def _per_pair(self, blocks):
        """One row per pair; each block padded, then permuted."""
        tokens, take, counts, off = [], [], [], 0
        for _, t in blocks:
            slots = t.tolist() + [-1] * _padding(len(t), self.pad)
            order = _perm(len(slots), self.shuffle_gen)
            where = [0] * len(slots)
            for j, i in enumerate(order):
                where[i] = j
            tokens += [slots[i] for i in order]
            take += [off + where[i] for i in range(len(t))]
            counts.append(len(slots))
            off += len(slots)
        return Layout([e for e, _ in blocks], counts, torch.tensor(tokens, dtype=torch.long), None,
                      torch.tensor(take, dtype=torch.long), [len(t) for _, t in blocks])

    def _dedup(self, blocks):
        """One row per token (and per dummy pair); pairs point at rows."""
        unique = sorted({int(x) for _, t in blocks for x in t.tolist()})
        pads = [_padding(len(t), self.pad) for _, t in blocks]
        rows = unique + [-1] * sum(pads)
        order = _perm(len(rows), self.shuffle_gen)
        wire_row = [0] * len(rows)
        for j, i in enumerate(order):
            wire_row[i] = j
        of_token = {tok: wire_row[i] for i, tok in enumerate(unique)}
        index, take, counts, off, dummy = [], [], [], 0, len(unique)
        for (_, t), pad in zip(blocks, pads):
            real = [of_token[int(x)] for x in t.tolist()]
            pairs = sorted(real + [wire_row[dummy + i] for i in range(pad)])
            dummy += pad
            at = {r: off + k for k, r in enumerate(pairs)}
            take += [at[r] for r in real]
            index += pairs
            counts.append(len(pairs))
            off += len(pairs)
        return Layout([e for e, _ in blocks], counts, torch.tensor([rows[i] for i in order], dtype=torch.long),
                      torch.tensor(index, dtype=torch.long), torch.tensor(take, dtype=torch.long),
                      [len(t) for _, t in blocks])

    def hidden(self, layout, flat):
        """The ``hidden`` rows of ``layout`` from the layer's expert inputs ``flat`` [T, H]:
        real rows copied, dummy rows drawn like the real ones (per-feature mean and std)."""
        out = flat[layout.row_tokens.clamp_min(0).to(flat.device)]
        dummy = layout.dummy
        if dummy.any():
            ref = flat.float()
            noise = torch.randn((int(dummy.sum()), flat.shape[1]), generator=self.pad_gen)
            fake = ref.mean(0) + ref.std(0, unbiased=False) * noise.to(flat.device)
            out[dummy.to(flat.device)] = fake.to(out.dtype)
        return out
