"""Parsing of human-written sizes and rates: '2GiB', '512MB', '60Mbit'."""
import re

_SIZE = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
         "t": 1e12, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value):
    """'2GiB' -> 2147483648; ints pass through. Raises ValueError naming the value."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if value < 0:
            raise ValueError(f"must be >= 0 (got {value})")
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(value))
    if not m or m.group(2).lower() not in _SIZE:
        raise ValueError(f"expected a size like 2GiB, 512MB or a byte count (got {value!r})")
    return int(float(m.group(1)) * _SIZE[m.group(2).lower()])
