"""Secure aggregation for FedAvg / FedSGD: the coordinator learns the sum of the updates only.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017, https://eprint.iacr.org/2017/281 -- the pairwise-masking core of the protocol:

1. Setup (once, ``step = -1``): every party makes an X25519 key pair and sends its public
   key to the coordinator (kind ``secagg_key``); the coordinator relays all of them to
   every party (kind ``secagg_keys``).  Parties i and j derive the same 32-byte key
   ``k_ij = HKDF-SHA256(X25519(sk_i, pk_j))`` without the coordinator learning it.
2. Each round, party i encodes its *weighted* update ``n_i * x_i`` (``n_i`` = its
   ``n_samples``) in fixed point, ``round(v * 2**frac_bits)`` modulo 2**32, and adds, for
   every other party j selected in the round, the one-time pad
   ``AES-256-CTR(k_ij, nonce = round | tensor index)`` as uint32 words -- with ``+`` when
   ``i < j`` and ``-`` when ``i > j``.  What it sends (int32 tensors, 4 bytes per
   element as before) is uniformly distributed to anyone without the pads.
3. The coordinator adds the masked tensors modulo 2**32: every pad appears once with
   each sign and cancels, leaving ``sum_i n_i x_i`` in fixed point, which it decodes
   (two's complement) and divides by ``sum_i n_i``: the same weighted mean as without
   the defence, up to the fixed-point rounding (at most ``n_selected * 2**-(frac_bits+1)``
   per element of the sum).

Simplifications, said plainly: no dropout recovery (the paper secret-shares each party's
mask seeds so the survivors can unmask; here a selected party that does not answer stalls
the round, exactly as without the defence); no double masking; the coordinator relays
public keys honestly (semi-honest model, no PKI).  Each value is clamped so that the sum
of all selected parties cannot overflow (``|n_i x_i| < 2**31 / (n_selected * 2**frac_bits)``);
a clamped update is logged.
"""
import logging
import struct

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from testbed.errors import ConfigError, ProtocolError

log = logging.getLogger(__name__)

MOD = 1 << 32
KEY, KEYS = "secagg_key", "secagg_keys"   # message kinds of the setup
META = "secagg"                            # meta key of a masked update: {"frac_bits": f}


def secagg_config(ctx):
    """The scenario's ``secagg`` defence entry, or None."""
    entries = [d for d in ctx.scenario.defences if d.type == "secagg"]
    if len(entries) > 1:
        raise ConfigError("defences", [f"only one secagg entry is allowed (got {len(entries)})"])
    return entries[0] if entries else None


def new_keypair(seed_bytes=None):
    """(private key, raw 32-byte public key).  ``seed_bytes``: 32 bytes for a reproducible key."""
    sk = X25519PrivateKey.from_private_bytes(seed_bytes) if seed_bytes else X25519PrivateKey.generate()
    pk = sk.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return sk, pk


def pair_key(sk, peer_public):
    """The 32-byte AES key two parties share: HKDF-SHA256 of their X25519 secret."""
    shared = sk.exchange(X25519PublicKey.from_public_bytes(bytes(peer_public)))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                info=b"testbed secagg pair key").derive(shared)


def pad(key, round_, index, numel):
    """``numel`` uint32 words of AES-256-CTR keystream for (round, tensor index), as int64."""
    nonce = struct.pack(">qI", round_, index) + b"\0" * 4
    stream = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor().update(bytes(4 * numel))
    return torch.from_numpy(np.frombuffer(stream, dtype="<u4").astype(np.int64))


def encode(t, frac_bits):
    """float tensor -> int64 fixed-point values in [0, 2**32) (two's complement)."""
    return torch.round(t.double() * (1 << frac_bits)).to(torch.int64) % MOD


def decode(v, frac_bits):
    """int64 values in [0, 2**32) -> float64 (two's complement, divided by 2**frac_bits)."""
    signed = torch.where(v >= MOD // 2, v - MOD, v)
    return signed.double() / (1 << frac_bits)


def to_wire(v):
    """int64 in [0, 2**32) -> int32 with the same 32 bits."""
    return torch.where(v >= MOD // 2, v - MOD, v).to(torch.int32)


def from_wire(t):
    return t.to(torch.int64) % MOD


class Masker:
    """One party's side: its key pair, the pair keys once the setup is done, and masking."""

    def __init__(self, me, seed_bytes, frac_bits):
        self.me, self.frac_bits = me, frac_bits
        self.sk, self.public = new_keypair(seed_bytes)
        self.keys = {}

    def setup(self, publics):
        """``publics``: party name -> raw public key (from the coordinator's relay)."""
        if publics.get(self.me) != self.public:
            raise ProtocolError(f"{self.me}: the relayed key list does not hold this party's own key")
        self.keys = {p: pair_key(self.sk, pk) for p, pk in publics.items() if p != self.me}

    def mask(self, tensors, weight, round_, selected):
        """``weight * tensors`` in fixed point plus this party's pads for ``selected`` (names)."""
        limit = (MOD // 2 - 1) / (len(selected) * (1 << self.frac_bits))
        out, clamped = {}, 0
        for index, name in enumerate(sorted(tensors)):
            v = tensors[name].detach().double() * weight
            clamped += int((v.abs() > limit).sum())
            v = encode(v.clamp(-limit, limit), self.frac_bits).reshape(-1)
            for peer in selected:
                if peer == self.me:
                    continue
                p = pad(self.keys[peer], round_, index, v.numel())
                v = (v + p) % MOD if self.me < peer else (v - p) % MOD
            out[name] = to_wire(v).reshape(tensors[name].shape)
        if clamped:
            log.warning("%s: secagg clamped %d values of round %d to +-%.3g", self.me, clamped, round_, limit)
        return out


def unmask_mean(messages, frac_bits):
    """The coordinator's side: ``[(masked tensors, weight), ...]`` -> weighted mean (float32)."""
    total = float(sum(w for _, w in messages))
    if total <= 0:
        raise ProtocolError(f"secagg: weights must sum to > 0 (got {total})")
    out = {}
    for name in messages[0][0]:
        s = sum(from_wire(m[name]) for m, _ in messages) % MOD
        out[name] = (decode(s, frac_bits) / total).to(torch.float32)
    return out
