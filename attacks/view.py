"""The adversary view: what one observer saw on the wire, plus the public knowledge its
threat model grants. Never anything from ``truth/``.

``AdversaryView(run_dir, observer, knowledge)`` reads ``capture/index.jsonl`` and keeps the
messages the observer sent or received (``wire`` sees every message).  Tensors load lazily
from ``capture/tensors/*.safetensors`` with ``safe_open``.  Public knowledge comes from
``public/`` (tokenizer, starting checkpoint), from the public part of ``scenario.yaml``
(model shape, batch size, sequence length; never the seed) and from the data generator
run with another seed and no canaries (auxiliary text).  Asking for knowledge the threat
model does not grant raises :class:`ThreatModelError`.

    from .view import AdversaryView
    view = AdversaryView("runs/fedsgd-tiny-...", "coordinator")
    for msg in view.messages(kind="grad", step=0):
        g = msg.tensor("model.embed_tokens.weight")
"""
import copy
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from safetensors import safe_open

from testbed.errors import TestbedError
from testbed.rundir import iter_jsonl

from .base import KNOWLEDGE

WIRE = "wire"


class ThreatModelError(TestbedError):
    """An attack asked for something its threat model does not grant."""

    exit_code = 6


@dataclass
class CapturedMessage:
    """One captured message as an observer saw it; tensors are loaded on demand."""

    seq: int
    protocol: str
    step: int
    src: str
    dst: str
    kind: str
    meta: dict
    bytes: int
    specs: dict                  # tensor name -> {"key", "dtype", "shape"}
    file: object = None          # absolute Path of the safetensors file, or None
    _store: object = field(default=None, repr=False)

    @property
    def names(self):
        return list(self.specs)

    @property
    def has_tensors(self):
        """Whether the capture kept this message's tensors (or it had none)."""
        return self.file is not None or not self.specs

    def tensor(self, name):
        """The tensor ``name`` of this message (a fresh CPU tensor)."""
        if name not in self.specs:
            raise KeyError(f"message {self.seq} ({self.kind}): no tensor {name!r}; "
                           f"has {', '.join(self.specs)}")
        if self.file is None:
            raise ThreatModelError(f"message {self.seq} ({self.kind}, step {self.step}): the capture kept "
                                   "no tensors for it (capture.tensors); no tensor data to attack")
        return self._store.get(self.file, self.specs[name]["key"])

    def tensors(self):
        return {n: self.tensor(n) for n in self.specs}

    def received(self, name):
        """The tensor ``name`` as the receiving role saw it: a transmission defence's
        encoding (int8/bf16 quantization, top-k sparsification) undone."""
        from parties.defences import restore_tensor
        return restore_tensor(self.meta, name, self.tensor)

    @property
    def received_names(self):
        """Tensor names without the helper tensors an encoding added."""
        from parties.defences import encoded_extras
        extras = encoded_extras(self.meta)
        return [n for n in self.specs if n not in extras]


class _TensorStore:
    """Keeps one open safetensors handle per file."""

    def __init__(self):
        self._handles = {}

    def get(self, path, key):
        if path not in self._handles:
            self._handles[path] = safe_open(str(path), framework="pt")
        return self._handles[path].get_tensor(key)


@dataclass
class MessageGroup:
    """Messages sharing a key (e.g. one party's gradient at one step), tensors merged by
    name; a later message's tensor replaces an earlier one of the same name."""

    key: dict
    messages: list

    @property
    def names(self):
        return list(dict.fromkeys(n for m in self.messages for n in m.specs))

    def tensor(self, name):
        for m in reversed(self.messages):
            if name in m.specs:
                return m.tensor(name)
        raise KeyError(f"group {self.key}: no tensor {name!r}")

    def tensors(self):
        return {n: self.tensor(n) for n in self.names}

    @property
    def received_names(self):
        return list(dict.fromkeys(n for m in self.messages for n in m.received_names))

    def received(self, name):
        """Like :meth:`tensor`, as the receiver saw it (see :meth:`CapturedMessage.received`)."""
        for m in reversed(self.messages):
            if name in m.specs:
                return m.received(name)
        raise KeyError(f"group {self.key}: no tensor {name!r}")


class AdversaryView:
    """The messages ``observer`` saw in one run, and the public knowledge in ``knowledge``.

    ``observer``: a role of the run (``coordinator``, ``server``, ``cloud``, ``party-2``)
    or ``wire`` (every message).  ``knowledge``: keys of :data:`attacks.base.KNOWLEDGE`
    (default: all of them).  ``protocol``: which captured protocol (default: the
    scenario's).
    """

    def __init__(self, run_dir, observer, knowledge=None, protocol=None):
        self._root = Path(run_dir)
        self.observer = observer
        self.knowledge = frozenset(KNOWLEDGE if knowledge is None else knowledge)
        unknown = self.knowledge - set(KNOWLEDGE)
        if unknown:
            raise ValueError(f"knowledge: unknown {sorted(unknown)}; valid: {', '.join(KNOWLEDGE)}")
        scen = self._public_path("scenario.yaml")
        if not scen.is_file():
            raise ValueError(f"{self._root}: not a run directory (no scenario.yaml)")
        self._scenario = yaml.safe_load(scen.read_text())
        self.protocol = protocol or self._scenario["protocol"]["name"]
        self._store = _TensorStore()
        everything = self._read_index()
        self.roles = sorted({r for m in everything for r in (m.src, m.dst)})
        if observer != WIRE and observer not in self.roles:
            raise ValueError(f"observer {observer!r} saw nothing in {self.protocol} traffic; "
                             f"valid: {', '.join([WIRE] + self.roles)}")
        self._messages = [m for m in everything
                          if observer == WIRE or observer in (m.src, m.dst)]
        # capture.tensors kept some steps' tensors but not all (metadata-only runs are not)
        self.selective = any(m.file for m in everything) and not all(m.has_tensors for m in everything)
        self._cache = {}

    # -- traffic -------------------------------------------------------------------------
    def _public_path(self, rel):
        # The single place a path is formed: truth/ is not reachable through the view.
        if Path(rel).parts[:1] == ("truth",):
            raise ThreatModelError(f"{rel}: truth/ is for scoring only, never in an adversary view")
        return self._root / rel

    def _read_index(self):
        out = []
        for rec in iter_jsonl(self._public_path("capture/index.jsonl")):
            if rec.get("protocol") != self.protocol:
                continue
            file = self._public_path(Path("capture") / rec["file"]) if rec.get("file") else None
            out.append(CapturedMessage(
                seq=rec["seq"], protocol=rec["protocol"], step=rec["step"], src=rec["src"],
                dst=rec["dst"], kind=rec["kind"], meta=rec.get("meta") or {},
                bytes=rec.get("bytes", 0), specs=rec.get("tensors") or {}, file=file,
                _store=self._store))
        return out

    def messages(self, kind=None, src=None, dst=None, step=None, with_tensors=False, **meta):
        """Observed messages, filtered: ``kind``/``src``/``dst``/``step`` may be one value or
        a collection; ``meta`` keys must equal the given values.  ``with_tensors``: in a
        selective capture (``capture.tensors`` kept some steps), only messages whose
        tensors were kept."""
        def ok(value, want):
            if want is None:
                return True
            if isinstance(want, (list, tuple, set, frozenset)):
                return value in want
            return value == want
        return [m for m in self._messages
                if ok(m.kind, kind) and ok(m.src, src) and ok(m.dst, dst) and ok(m.step, step)
                and all(m.meta.get(k) == v for k, v in meta.items())
                and not (with_tensors and self.selective and not m.has_tensors)]

    def groups(self, kind=None, by=("src", "step"), **filters):
        """Observed messages grouped by the given fields (message attributes or meta keys),
        in order of first appearance."""
        out = {}
        for m in self.messages(kind=kind, **filters):
            key = tuple(getattr(m, f) if hasattr(m, f) and f != "meta" else m.meta.get(f) for f in by)
            out.setdefault(key, []).append(m)
        return [MessageGroup(dict(zip(by, k)), msgs) for k, msgs in out.items()]

    def kinds(self):
        """Message kind -> how many the observer saw."""
        return dict(Counter(m.kind for m in self._messages))

    def parties(self):
        return [r for r in self.roles if r.startswith("party-")]

    # -- public knowledge ----------------------------------------------------------------
    def _need(self, what):
        if what not in self.knowledge:
            raise ThreatModelError(f"observer {self.observer!r}: {what} ({KNOWLEDGE[what]}) is not "
                                   f"in this threat model's knowledge ({', '.join(sorted(self.knowledge))})")

    def config(self):
        """Public hyperparameters: model, training, protocol, defences and party count (no
        seed: it would regenerate the private records; no data beyond its kinds)."""
        self._need("config")
        sc = self._scenario
        return copy.deepcopy({"model": sc["model"], "training": sc["training"],
                              "protocol": sc["protocol"], "defences": sc.get("defences", []),
                              "parties": {"count": sc["parties"]["count"]},
                              "data": {"kinds": sc["data"]["kinds"]}})

    def tokenizer(self):
        """The shared ``tokenizers.Tokenizer``."""
        self._need("tokenizer")
        if "tokenizer" not in self._cache:
            from parties.data.tokenizer import load_tokenizer
            self._cache["tokenizer"] = load_tokenizer(self._public_path("public/tokenizer.json"))
        return self._cache["tokenizer"]

    def decode(self, ids):
        from parties.data.tokenizer import decode_ids
        return decode_ids(self.tokenizer(), ids)

    def init_model(self):
        """A fresh copy of the shared starting checkpoint, in eval mode, on CPU."""
        self._need("init_model")
        if "init_model" not in self._cache:
            from transformers import AutoModelForCausalLM
            from transformers.utils import logging as hf_logging
            was = hf_logging.is_progress_bar_enabled()
            hf_logging.disable_progress_bar()
            try:
                self._cache["init_model"] = AutoModelForCausalLM.from_pretrained(
                    self._public_path("public/init-model"))
            finally:
                if was:
                    hf_logging.enable_progress_bar()
        return copy.deepcopy(self._cache["init_model"]).eval()

    def aux_text(self, n):
        """``n`` public texts from the scenario's data generator, another seed, no canaries.

        For file-sourced data there is no public generator: raises ThreatModelError.
        """
        self._need("aux_text")
        sc = self._scenario["data"]
        if sc.get("source", "generate") != "generate":
            raise ThreatModelError(f"aux_text: data.source is {sc.get('source')!r}; public auxiliary "
                                   "text exists only for generated data")
        from parties.data.generator import generate_records
        from testbed.scenario import CanaryCfg
        # A string seed gives a stream unrelated to the private one (random.Random(int seed)).
        rng = random.Random(f"public-aux-text/{self._scenario.get('seed', 0)}")
        records, _ = generate_records(sc["kinds"], n, rng, CanaryCfg(count=0))
        return [r["text"] for r in records]
