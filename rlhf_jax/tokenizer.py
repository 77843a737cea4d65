"""Tokenizers: byte-level by default (no files), a local tokenizer file later.

Batch helpers build the buffer layout every model call uses: prompts
left-padded to a fixed length, responses right-padded after them.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np


class Tokenizer(Protocol):
  vocab_size: int
  pad_id: int
  bos_id: int
  eos_id: int

  def encode(self, text: str) -> list[int]: ...

  def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes 0..255, then PAD=256, BOS=257, EOS=258 (vocab rounded to 260)."""

  vocab_size = 260
  pad_id = 256
  bos_id = 257
  eos_id = 258

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8"))

  def decode(self, ids: Sequence[int]) -> str:
    """Bytes up to the first EOS; special tokens dropped; invalid UTF-8 replaced."""
    out = bytearray()
    for i in ids:
      i = int(i)
      if i == self.eos_id:
        break
      if 0 <= i < 256:
        out.append(i)
    return out.decode("utf-8", errors="replace")


class HFTokenizer:
  """A local `tokenizer.json` (Hugging Face `tokenizers` format); never downloads."""

  def __init__(self, path: str, *, bos: str = "<|begin_of_text|>", eos: str = "<|end_of_text|>", pad: str | None = None):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover - optional dependency
      raise ImportError("reading a tokenizer file needs the `tokenizers` package (pip install tokenizers)") from e
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size()
    self.bos_id = self._tok.token_to_id(bos)
    self.eos_id = self._tok.token_to_id(eos)
    if self.bos_id is None or self.eos_id is None:
      raise ValueError(f"{path}: BOS {bos!r} or EOS {eos!r} is not in the vocabulary")
    self.pad_id = self._tok.token_to_id(pad) if pad else self.eos_id

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self._tok.decode([i for i in ids if i != self.pad_id and i != self.bos_id])


def load_tokenizer(path: str | None = None) -> Tokenizer:
  """The byte tokenizer, or the tokenizer file at `path`."""
  return ByteTokenizer() if not path else HFTokenizer(path)


def encode_prompts(tok: Tokenizer, prompts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """BOS + prompt, left-padded to `max_len`; over-long prompts keep their end.

  Returns tokens [B, max_len] int32 and mask [B, max_len] int32.
  """
  tokens = np.full((len(prompts), max_len), tok.pad_id, np.int32)
  mask = np.zeros((len(prompts), max_len), np.int32)
  for i, p in enumerate(prompts):
    ids = ([tok.bos_id] + tok.encode(p))[-max_len:]
    tokens[i, max_len - len(ids):] = ids
    mask[i, max_len - len(ids):] = 1
  return tokens, mask


def encode_pairs(tok: Tokenizer, prompts: Sequence[str], responses: Sequence[str], max_prompt_len: int,
                 max_response_len: int, *, add_eos: bool = True) -> dict[str, np.ndarray]:
  """Prompt (left-padded) then response (right-padded, + EOS) in one buffer.

  Returns tokens, mask (real tokens) and loss_mask (response tokens incl. EOS),
  all [B, max_prompt_len + max_response_len] int32. Over-long responses are
  truncated (and then carry no EOS).
  """
  if len(prompts) != len(responses):
    raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
  p_tok, p_mask = encode_prompts(tok, prompts, max_prompt_len)
  r_tok = np.full((len(prompts), max_response_len), tok.pad_id, np.int32)
  r_mask = np.zeros((len(prompts), max_response_len), np.int32)
  for i, r in enumerate(responses):
    ids = (tok.encode(r) + ([tok.eos_id] if add_eos else []))[:max_response_len]
    r_tok[i, : len(ids)] = ids
    r_mask[i, : len(ids)] = 1
  return {
      "tokens": np.concatenate([p_tok, r_tok], 1),
      "mask": np.concatenate([p_mask, r_mask], 1),
      "loss_mask": np.concatenate([np.zeros_like(p_mask), r_mask], 1),
  }
