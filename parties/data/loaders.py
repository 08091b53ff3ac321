"""Load user-supplied text records from local files.

Every loader returns records shaped like the generator's: ``{"id": index, "kind": str,
"text": str}`` (JSON sources keep their other fields too, so a split can use them as
labels). Nothing is ever fetched from the network.
"""
import json
from pathlib import Path

# File extension -> the Hugging Face ``datasets`` packaged builder that reads it.
DATASETS_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv",
                     ".parquet": "parquet"}


def load_records(cfg, base_dir):
    """Read the records that ``cfg`` (a :class:`testbed.scenario.DataCfg`) points at.

    ``cfg.path`` is resolved relative to ``base_dir`` (usually the scenario's folder).
    Sources: ``text`` (a .txt file, one record per non-empty line, or a folder of .txt
    files, one record per file), ``jsonl`` (text under ``cfg.text_field``) and
    ``datasets`` (``datasets.load_dataset`` on a local json/jsonl/txt/csv/parquet file).
    Raises ``ValueError`` naming the file (and line and key) on any problem.
    """
    loaders = {"text": _load_text, "jsonl": _load_jsonl, "datasets": _load_datasets}
    if cfg.source not in loaders:
        raise ValueError(f"data.source: {cfg.source!r} is not loaded from files; "
                         f"file sources: {', '.join(loaders)}")
    if not cfg.path:
        raise ValueError(f"data.path: required when data.source is {cfg.source!r}")
    path = Path(base_dir) / cfg.path
    if not path.exists():
        raise ValueError(f"{path}: file not found (data.path {cfg.path!r})")
    rows = loaders[cfg.source](path, cfg.text_field)
    if not rows:
        raise ValueError(f"{path}: no records found")
    return [{**row, "id": i} for i, row in enumerate(rows)]


def _load_text(path, _field):
    if path.is_dir():
        files = sorted(path.glob("*.txt"))
        if not files:
            raise ValueError(f"{path}: folder holds no .txt files")
        rows = [{"kind": "text", "source": f.name, "text": _read(f).strip()} for f in files]
        return [r for r in rows if r["text"]]
    return [{"kind": "text", "text": line.strip()} for line in _read(path).splitlines() if line.strip()]


def _load_jsonl(path, field):
    rows = []
    for lineno, line in enumerate(_read(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
        rows.append(_row(obj, field, f"{path}:{lineno}"))
    return rows


def _load_datasets(path, field):
    builder = DATASETS_BUILDERS.get(path.suffix.lower())
    if builder is None:
        raise ValueError(f"{path}: unsupported extension {path.suffix!r} for data.source 'datasets'; "
                         f"valid: {', '.join(DATASETS_BUILDERS)}")
    # Imported here: ``datasets`` is slow to import and only this source needs it.
    import datasets

    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as exc:
        raise ValueError(f"{path}: could not be read by datasets ({builder}): {exc}") from None
    return [_row(obj, field, f"{path}: row {i + 1}") for i, obj in enumerate(ds)]


def _row(obj, field, where):
    """Validate one JSON-like object and turn it into a record (without id)."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object (got {type(obj).__name__})")
    if field not in obj:
        raise ValueError(f"{where}: missing key {field!r} (data.text_field); keys: {', '.join(map(str, obj))}")
    text = obj[field]
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{where}: key {field!r} must be a non-empty string (got {text!r:.60})")
    kind = obj.get("kind")
    return {**obj, "kind": "text" if kind is None else str(kind), "text": text}


def _read(path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
