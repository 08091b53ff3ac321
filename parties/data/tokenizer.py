"""A small byte-level BPE tokenizer trained locally on the scenario's records.

Special tokens have fixed ids: ``<pad>`` = 0, ``<eos>`` = 1, ``<unk>`` = 2. Trained
tokenizers are cached on disk by a hash of the vocabulary size and the training texts,
so repeated runs of one scenario reuse the same vocabulary.
"""
import hashlib
import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
PAD_ID, EOS_ID, UNK_ID = 0, 1, 2
# With at least this many entries every byte has a token, so encoding is lossless.
LOSSLESS_VOCAB = 256 + len(SPECIAL_TOKENS)


def train_tokenizer(texts, vocab_size, cache_dir=None):
    """Train (or load from cache) a byte-level BPE tokenizer on ``texts``.

    The resulting vocabulary has at most ``vocab_size`` entries. Below
    :data:`LOSSLESS_VOCAB` only the most frequent bytes get tokens and the rest
    encode as ``<unk>``. With ``cache_dir`` the tokenizer is stored at
    ``cache_dir/<sha256>/tokenizer.json`` and loaded from there on the next call.
    Returns a ``tokenizers.Tokenizer``.
    """
    texts = list(texts)
    if not texts:
        raise ValueError("train_tokenizer: no texts to train on")
    if vocab_size < len(SPECIAL_TOKENS) + 1:
        raise ValueError(f"data.tokenizer.vocab_size: {vocab_size} is too small")
    if cache_dir is None:
        return _train(texts, vocab_size)
    path = Path(cache_dir) / _cache_key(texts, vocab_size) / "tokenizer.json"
    if path.exists():
        return load_tokenizer(path)
    tok = _train(texts, vocab_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write then rename, so a concurrent reader never sees a half-written file.
    tmp = path.with_name(f"tokenizer.json.{os.getpid()}.tmp")
    tok.save(str(tmp))
    os.replace(tmp, path)
    return tok


def load_tokenizer(path):
    """Load a local ``tokenizer.json`` (a file, or a folder that holds one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise ValueError(f"{path}: tokenizer file not found")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path}: not a valid tokenizer.json ({exc})") from None


def encode_records(tok, records):
    """Token ids of each record's ``text``, each list ending with ``<eos>`` (id 1)."""
    encs = tok.encode_batch([r["text"] for r in records], add_special_tokens=False)
    return [enc.ids + [EOS_ID] for enc in encs]


def decode_ids(tok, ids):
    """The text for ``ids``, with special tokens (``<pad>``, ``<eos>``, ...) dropped."""
    return tok.decode(list(ids), skip_special_tokens=True)


def _cache_key(texts, vocab_size):
    h = hashlib.sha256(f"byte-bpe-v1|{vocab_size}|{len(texts)}".encode())
    for t in texts:
        # Length-prefix each text so that different splits of one string differ.
        data = t.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


def _train(texts, vocab_size):
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if vocab_size >= LOSSLESS_VOCAB:
        alphabet = {"initial_alphabet": pre_tokenizers.ByteLevel.alphabet()}
    else:
        # The trainer never drops alphabet symbols, so cap them to stay within vocab_size.
        alphabet = {"limit_alphabet": vocab_size - len(SPECIAL_TOKENS)}
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  show_progress=False, **alphabet)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok
