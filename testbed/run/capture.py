"""Capture: every message on the wire, as the observers saw it.

``capture/index.jsonl`` gets one line per message (seq, step, src, dst, kind, meta,
bytes, tensor keys, file).  Tensors go to ``capture/tensors/<protocol>-step<N>.safetensors``
with keys ``<seq>/<name>``; a step's file is written when the step ends (or the run
closes), so a crash loses at most the unfinished step.
"""
import json
from pathlib import Path

from safetensors.torch import save_file


class CaptureWriter:
    def __init__(self, root, protocol, tensors=True):
        self.root = Path(root)
        (self.root / "tensors").mkdir(parents=True, exist_ok=True)
        self.protocol, self.keep_tensors = protocol, tensors
        self.seq = 0
        self._index = open(self.root / "index.jsonl", "a", buffering=1)
        self._pending, self._pending_lines, self._step = {}, [], None

    def _fname(self, step):
        return f"{self.protocol}-step{max(step, 0):06d}.safetensors"

    def record(self, msg, nbytes, header_bytes, sim_time):
        """Record one decoded message and its encoded size."""
        if self._step is not None and msg.step != self._step:
            self.flush()
        self._step = msg.step
        seq, self.seq = self.seq, self.seq + 1
        keys = []
        for name, t in msg.tensors.items():
            key = f"{seq}/{name}"
            keys.append(key)
            if self.keep_tensors:
                self._pending[key] = t.contiguous()
        self._pending_lines.append({
            "seq": seq, "protocol": self.protocol, "step": msg.step, "src": msg.src,
            "dst": msg.dst, "kind": msg.kind, "meta": msg.meta, "bytes": nbytes,
            "header_bytes": header_bytes, "sim_time": sim_time,
            "tensors": {n: {"key": k, "dtype": str(t.dtype).removeprefix("torch."),
                            "shape": list(t.shape)}
                        for (n, t), k in zip(msg.tensors.items(), keys)},
            "file": f"tensors/{self._fname(msg.step)}" if self.keep_tensors and keys else None,
        })

    def flush(self):
        if self._pending:
            path = self.root / "tensors" / self._fname(self._step)
            if path.exists():  # a step split by interleaving: keep earlier keys
                from safetensors.torch import load_file
                self._pending = {**load_file(str(path)), **self._pending}
            save_file(self._pending, str(path))
        for line in self._pending_lines:
            self._index.write(json.dumps(line, sort_keys=True) + "\n")
        self._pending, self._pending_lines = {}, []

    def close(self):
        self.flush()
        self._index.close()
