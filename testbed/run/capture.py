"""Capture: every message on the wire, as the observers saw it.

``capture/index.jsonl`` gets one line per message (seq, step, src, dst, kind, meta,
bytes, tensor keys, file).  Tensors go to ``capture/tensors/<protocol>-step<N>.safetensors``
with keys ``<seq>/<name>``; a step's file is written when the step ends (or the run
closes), so a crash loses at most the unfinished step.

``tensors`` chooses which messages keep their tensor bytes (``True``: all, ``False``:
none, or a :class:`~testbed.run.capture_policy.TensorSelection`); a message whose
tensors are not kept still gets its index line, with ``"file": null``.  A selection
with a ``last`` K rule holds the K most recent steps until a newer step (or the end of
the run) settles them, so a crash then loses at most those K steps.
"""
import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from .capture_policy import ALL, TensorSelection


class _Step:
    """One step's pending index lines and tensors; ``window`` tensors are kept only if
    the step ends among the last K."""

    def __init__(self):
        self.lines, self.tensors, self.window = [], {}, {}


class CaptureWriter:
    def __init__(self, root, protocol, tensors=True):
        self.root = Path(root)
        (self.root / "tensors").mkdir(parents=True, exist_ok=True)
        self.protocol = protocol
        self.selection = tensors if isinstance(tensors, TensorSelection) else ALL
        self.keep_tensors = tensors is not False
        self.seq = 0
        self._index = open(self.root / "index.jsonl", "a", buffering=1)
        self._held = {}          # step -> _Step, oldest first
        self._step = None

    def _fname(self, step):
        return f"{self.protocol}-step{max(step, 0):06d}.safetensors"

    def record(self, msg, nbytes, header_bytes, sim_time):
        """Record one decoded message and its encoded size."""
        sel = self.selection
        bucket = self._held.setdefault(msg.step, _Step())
        if msg.step != self._step:
            self._settle(msg.step)
        self._step = msg.step
        seq, self.seq = self.seq, self.seq + 1
        keep = self.keep_tensors and sel.keep(msg.step, msg.kind)
        window = self.keep_tensors and not keep and sel.in_window(msg.kind)
        fresh = not (bucket.tensors or bucket.window)
        keys = []
        for name, t in msg.tensors.items():
            key = f"{seq}/{name}"
            keys.append(key)
            if keep:
                bucket.tensors[key] = t.contiguous()
            elif window:
                bucket.window[key] = t.contiguous()
        line = {
            "seq": seq, "protocol": self.protocol, "step": msg.step, "src": msg.src,
            "dst": msg.dst, "kind": msg.kind, "meta": msg.meta, "bytes": nbytes,
            "header_bytes": header_bytes, "sim_time": sim_time,
            "tensors": {n: {"key": k, "dtype": str(t.dtype).removeprefix("torch."),
                            "shape": list(t.shape)}
                        for (n, t), k in zip(msg.tensors.items(), keys)},
            "file": f"tensors/{self._fname(msg.step)}" if keep and keys else None,
        }
        bucket.lines.append((line, window and bool(keys)))
        if sel.last and fresh and (bucket.tensors or bucket.window):
            self._settle(msg.step)   # one more step holds tensors: the oldest may leave the window

    def _settle(self, current):
        """Write every held step but ``current`` and the K highest that hold tensors
        (a step of control messages only takes no place among the last K); steps written
        here are not among the last K, so their window tensors are dropped."""
        last = self.selection.last
        newest = set(sorted(s for s, b in self._held.items()
                            if b.window or b.tensors)[-last:]) if last else set()
        for step in sorted(self._held):
            if step != current and step not in newest:
                self._write(step, self._held.pop(step), in_window=False)

    def _write(self, step, bucket, in_window):
        tensors = {**bucket.tensors, **(bucket.window if in_window else {})}
        if tensors:
            path = self.root / "tensors" / self._fname(step)
            if path.exists():  # a step split by interleaving: keep earlier keys
                tensors = {**load_file(str(path)), **tensors}
            save_file(tensors, str(path))
        for line, windowed in bucket.lines:
            if windowed and in_window:
                line["file"] = f"tensors/{self._fname(step)}"
            self._index.write(json.dumps(line, sort_keys=True) + "\n")

    def flush(self):
        """Write every step held so far (the last-K window included)."""
        for step in sorted(self._held):
            self._write(step, self._held.pop(step), in_window=True)

    def close(self):
        self.flush()
        self._index.close()
