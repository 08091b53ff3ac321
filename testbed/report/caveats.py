"""Whether the compared runs' losses can be compared at all.

A cross-entropy in nats depends on the vocabulary it is spread over and on the text it
is measured on: runs that differ in tokenizer / vocabulary size, in their data (source,
path, generator settings, split, held-out share) or in sequence length measure different
things, and a lower loss in one says nothing about the other.  :func:`loss_caveats` says
so in words, naming the keys that differ; the overview and learning sections show it.
"""
from .doc import flatten, fmt_cell

# Scenario keys that change the vocabulary, and those that change the text losses are taken on.
VOCAB_KEYS = ("data.tokenizer.vocab_size", "data.tokenizer.path")
DATA_PREFIXES = ("data.",)
DATA_KEYS = ("training.seq_len",)
IGNORED = ("data.tokenizer.cache_dir",)   # where a tokenizer is cached, not what it is


def _differing(runs, keys):
    """[(key, [value per run])] for the keys whose values are not all equal."""
    flat = [dict(flatten(r.scenario)) for r in runs]
    return [(k, [f.get(k) for f in flat]) for k in keys if len({fmt_cell(f.get(k)) for f in flat}) > 1]


def _values(runs, values):
    return ", ".join(f"{r.label} {fmt_cell(v)}" for r, v in zip(runs, values))


def loss_caveats(runs):
    """Sentences (empty when there is nothing to warn about) saying why the runs' losses
    are not comparable: differing vocabularies, data or sequence lengths."""
    runs = [r for r in runs if r.scenario]
    if len(runs) < 2:
        return []
    keys = list(dict.fromkeys(k for r in runs for k, _ in flatten(r.scenario)))
    vocab = _differing(runs, [k for k in VOCAB_KEYS if k in keys])
    data = _differing(runs, [k for k in keys if k not in VOCAB_KEYS and k not in IGNORED
                             and (k.startswith(DATA_PREFIXES) or k in DATA_KEYS)])
    sizes = [r.vocab_size for r in runs]
    if None not in sizes and len(set(sizes)) > 1:
        vocab.append(("tokenizer vocabulary (public/tokenizer.json)", sizes))
    out = []
    if vocab:
        out.append("Losses are not comparable across these runs: their vocabularies differ ("
                   + "; ".join(f"{k}: {_values(runs, v)}" for k, v in vocab)
                   + "), and a cross-entropy depends on the vocabulary it is spread over.")
    if data:
        out.append("Losses are not comparable across these runs: they are measured on different data ("
                   + "; ".join(f"{k}: {_values(runs, v)}" for k, v in data) + ").")
    return out
