"""Tokenizers: bytes (the default) and loaders for local HF tokenizer.json and SentencePiece models.

Each exposes `encode(text) -> int32[N]`, `decode(ids) -> str`, `vocab_size`, and the special ids
`bos_id`, `eos_id`, `pad_id`. Nothing is downloaded: paths are local files.
"""
import os

import numpy as np


class ByteTokenizer:
  """UTF-8 bytes 0..255, then PAD=256, BOS=257, EOS=258."""
  vocab_size = 259
  pad_id, bos_id, eos_id = 256, 257, 258
  is_bytes = True

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")


def _first_line(error) -> str:
  return (str(error).strip().splitlines() or [type(error).__name__])[0][:200]


def _require_file(path, kind):
  if not os.path.isfile(path):
    raise ValueError(f"data.tokenizer_path={path!r} is not a file; point it at a local {kind}")


class HFTokenizer:
  """A local Hugging Face `tokenizer.json` (via the `tokenizers` package)."""
  is_bytes = False
  _BOS = ("<|begin_of_text|>", "<s>", "<bos>", "[CLS]", "<|endoftext|>")
  _EOS = ("<|end_of_text|>", "</s>", "<eos>", "[SEP]", "<|endoftext|>")

  def __init__(self, path: str):
    _require_file(path, "tokenizer.json")
    import tokenizers
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the Rust library raises plain Exceptions
      raise ValueError(f"data.tokenizer_path={path!r} is not a Hugging Face tokenizer.json "
                       f"({_first_line(e)}); point it at a tokenizer.json") from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.bos_id = self._special(self._BOS, path)
    self.eos_id = self._special(self._EOS, path)
    pad = self._tok.token_to_id("<pad>")
    self.pad_id = self.eos_id if pad is None else pad

  def _special(self, names, path):
    for name in names:
      idx = self._tok.token_to_id(name)
      if idx is not None:
        return idx
    raise ValueError(f"tokenizer {path!r} has none of the special tokens {names}; add one")

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

  def decode(self, ids) -> str:
    return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


class SentencePieceTokenizer:
  """A local SentencePiece `.model` file."""
  is_bytes = False

  def __init__(self, path: str):
    _require_file(path, "SentencePiece .model file")
    import sentencepiece
    try:
      self._sp = sentencepiece.SentencePieceProcessor(model_file=path)
    except (RuntimeError, OSError) as e:
      raise ValueError(f"data.tokenizer_path={path!r} is not a SentencePiece model "
                       f"({_first_line(e)}); point it at a .model file") from None
    self.vocab_size = self._sp.get_piece_size()
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f"SentencePiece model {path!r} lacks a BOS or EOS piece; train it with "
                       "bos_id and eos_id set")
    self.pad_id = self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eos_id

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.encode(text), np.int32)

  def decode(self, ids) -> str:
    return self._sp.decode([int(i) for i in ids])


def make_tokenizer(data_config):
  kind = data_config.tokenizer
  if kind == "bytes":
    return ByteTokenizer()
  if kind == "hf":
    return HFTokenizer(data_config.tokenizer_path)
  if kind == "sentencepiece":
    return SentencePieceTokenizer(data_config.tokenizer_path)
  raise ValueError(f"data.tokenizer must be bytes, hf or sentencepiece; got {kind!r}")


def identity(data_config, tokenizer) -> dict:
  """What decides a tokenizer's ids: its kind, the SHA-256 of its file (none for bytes), its
  vocabulary size and special ids. A prepared corpus records it; a run checks it."""
  import hashlib
  digest = ""
  if data_config.tokenizer != "bytes":
    with open(data_config.tokenizer_path, "rb") as f:
      digest = hashlib.sha256(f.read()).hexdigest()
  return {"kind": data_config.tokenizer, "sha256": digest, "vocab_size": int(tokenizer.vocab_size),
          "bos_id": int(tokenizer.bos_id), "eos_id": int(tokenizer.eos_id),
          "pad_id": int(tokenizer.pad_id)}
