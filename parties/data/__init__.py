"""Data for the parties: synthetic private records, file loaders, tokenizer, splits."""
from .generator import CANARY_FIELDS, KINDS, generate_records
from .loaders import load_records
from .partition import partition
from .tokenizer import (EOS_ID, PAD_ID, SPECIAL_TOKENS, UNK_ID, decode_ids, encode_records, load_tokenizer,
                        train_tokenizer)

__all__ = ["CANARY_FIELDS", "KINDS", "generate_records", "load_records", "partition", "EOS_ID", "PAD_ID",
           "SPECIAL_TOKENS", "UNK_ID", "decode_ids", "encode_records", "load_tokenizer", "train_tokenizer"]
