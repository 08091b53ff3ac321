"""Merging scenario overrides (``--set``, sweep grids, the gate's ``set:``) into a scenario's data."""


def deep_merge(base, extra, _where=""):
    """``extra`` merged into ``base``: mappings key by key, anything else replaced; a mapping of
    item numbers merges into a list's items (``{'defences': {'0': {'sigma': 0.1}}}``: the first
    defence's sigma); IndexError naming the dotted key for an item the list lacks."""
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out.get(k), v, f"{_where}{k}")
    return out


def _merge(old, new, where):
    if isinstance(new, dict) and isinstance(old, dict):
        return deep_merge(old, new, where + ".")
    if not (isinstance(new, dict) and isinstance(old, list) and new and all(str(i).isdigit() for i in new)):
        return new
    out = list(old)
    for i, v in ((int(i), v) for i, v in new.items()):
        if i >= len(out):
            hint = f"; give the whole list, e.g. {where}=[...]" if not out else ""
            raise IndexError(f"{where}.{i}: no such item ({where} has {len(out)}{hint})")
        out[i] = _merge(out[i], v, f"{where}.{i}")
    return out
