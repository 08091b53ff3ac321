"""Split records across parties: IID or with controlled label / quantity skew.

All randomness comes from the ``random.Random`` passed in (never numpy's or Python's
global state), so a scenario seed fixes the split.
"""
from collections import defaultdict


def partition(records, n_parties, cfg, rng):
    """Assign every record to exactly one of ``n_parties`` shards.

    Inputs: records (dicts; the label is ``record[cfg.label]``), the party count, a
    :class:`testbed.scenario.SplitCfg` and a seeded ``random.Random``.
    Returns one sorted list of record indices per party; every party gets at least one.

    Methods: ``iid`` (shuffle and deal evenly), ``dirichlet`` (each label's records
    split by Dirichlet(alpha) proportions: small alpha = each party sees few labels),
    ``quantity`` (shard sizes ~ Dirichlet(alpha): small alpha = very unequal sizes,
    labels ignored), ``by_source`` (each label value goes whole to one party).
    """
    methods = {"iid": _iid, "dirichlet": _dirichlet, "quantity": _quantity, "by_source": _by_source}
    if cfg.method not in methods:
        raise ValueError(f"data.split.method: unknown method {cfg.method!r}; valid: {', '.join(methods)}")
    if n_parties < 1:
        raise ValueError(f"parties.count: must be >= 1 (got {n_parties})")
    if len(records) < n_parties:
        raise ValueError(f"data: {len(records)} records cannot give each of {n_parties} parties one")
    shards = methods[cfg.method](records, n_parties, cfg, rng)
    return [sorted(s) for s in shards]


def _iid(records, n, _cfg, rng):
    idx = list(range(len(records)))
    rng.shuffle(idx)
    return [idx[p::n] for p in range(n)]


def _dirichlet(records, n, cfg, rng):
    shards = [[] for _ in range(n)]
    for _, idx in _by_label(records, cfg.label):
        rng.shuffle(idx)
        for p, (lo, hi) in enumerate(_cuts(_dirichlet_draw(n, cfg.alpha, rng), len(idx))):
            shards[p].extend(idx[lo:hi])
    # A party left empty by the draw takes one record from the currently largest shard.
    for p in range(n):
        if not shards[p]:
            donor = max(range(n), key=lambda q: len(shards[q]))
            shards[p].append(shards[donor].pop(rng.randrange(len(shards[donor]))))
    return shards


def _quantity(records, n, cfg, rng):
    idx = list(range(len(records)))
    rng.shuffle(idx)
    # One record each up front guarantees no empty party; the rest follow the draw.
    spare = len(idx) - n
    sizes = [1 + (hi - lo) for lo, hi in _cuts(_dirichlet_draw(n, cfg.alpha, rng), spare)]
    shards, start = [], 0
    for size in sizes:
        shards.append(idx[start:start + size])
        start += size
    return shards


def _by_source(records, n, cfg, rng):
    groups = _by_label(records, cfg.label)
    if len(groups) < n:
        values = ", ".join(repr(v) for v, _ in groups)
        raise ValueError(f"data.split.method: by_source needs at least one {cfg.label!r} value per party "
                         f"({len(groups)} values [{values}] for {n} parties)")
    rng.shuffle(groups)
    shards = [[] for _ in range(n)]
    for i, (_, idx) in enumerate(groups):
        shards[i % n].extend(idx)
    return shards


def _by_label(records, label):
    """``[(value, [indices])]`` sorted by value, so the order never depends on hashing."""
    groups = defaultdict(list)
    for i, r in enumerate(records):
        if label not in r:
            raise ValueError(f"data.split.label: record {r.get('id', i)} has no key {label!r}")
        groups[r[label]].append(i)
    return sorted(groups.items(), key=lambda kv: (type(kv[0]).__name__, str(kv[0])))


def _dirichlet_draw(n, alpha, rng):
    """Proportions ~ Dirichlet(alpha, ..., alpha) from normalised Gamma draws."""
    g = [rng.gammavariate(alpha, 1.0) for _ in range(n)]
    total = sum(g)
    if total <= 0:
        # Tiny alpha can underflow every draw to 0; the limit is all mass on one party.
        g, total = [0.0] * n, 1.0
        g[rng.randrange(n)] = 1.0
    return [x / total for x in g]


def _cuts(props, count):
    """``[(lo, hi)]`` slices of ``count`` items following ``props`` (largest remainder)."""
    raw = [p * count for p in props]
    sizes = [int(x) for x in raw]
    by_remainder = sorted(range(len(raw)), key=lambda i: raw[i] - sizes[i], reverse=True)
    for i in by_remainder[:count - sum(sizes)]:
        sizes[i] += 1
    out, lo = [], 0
    for s in sizes:
        out.append((lo, lo + s))
        lo += s
    return out
