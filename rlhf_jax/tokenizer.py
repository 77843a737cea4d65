"""Tokenizers: byte-level by default (no files), or a local Hugging Face tokenizer with its chat template.

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
  """A local `tokenizer.json` (Hugging Face `tokenizers` format); never downloads.

  `HFTokenizer(path)` reads one tokenizer.json with the given special-token
  strings; `HFTokenizer.from_pretrained_dir(dir)` reads a checkpoint's
  tokenizer.json and tokenizer_config.json, taking BOS/EOS/PAD and the chat
  template from the checkpoint. `bos_id` is None when the checkpoint has no
  BOS token (Qwen); `pad_id` falls back to EOS.
  """

  def __init__(self, path: str, *, bos: str | None = "<|begin_of_text|>", eos: str = "<|end_of_text|>",
               pad: str | None = None, chat_template: str | None = None, extra_tokens: dict | None = None,
               chat_prompts: bool = False):
    try:
      import tokenizers  # pylint: disable=import-outside-toplevel
    except ImportError as e:  # pragma: no cover - optional dependency
      raise ImportError("reading a tokenizer file needs the `tokenizers` package (pip install tokenizers)") from e
    if not os.path.isfile(path):
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    self._tok = tokenizers.Tokenizer.from_file(path)
    self.vocab_size = self._tok.get_vocab_size()
    self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
    self.bos_id = self._tok.token_to_id(bos) if bos else None
    self.eos_id = self._tok.token_to_id(eos) if eos else None
    if (bos and self.bos_id is None) or self.eos_id is None:
      raise ValueError(f"{path}: BOS {bos!r} or EOS {eos!r} is not in the vocabulary")
    self.pad_id = self._tok.token_to_id(pad) if pad else self.eos_id
    if self.pad_id is None:
      raise ValueError(f"{path}: PAD {pad!r} is not in the vocabulary")
    self.chat_template = chat_template
    if chat_prompts and not chat_template:
      raise ValueError(f"{path}: chat_prompts=True but the tokenizer has no chat template")
    # Every prompt encoded with this tokenizer is first put in the chat template (`format_prompt`).
    self.chat_prompts = bool(chat_prompts)
    self._extra_tokens = dict(extra_tokens or {})
    self._compiled_template = None

  @classmethod
  def from_pretrained_dir(cls, path: str, *, chat_prompts: bool = False) -> "HFTokenizer":
    """The tokenizer of a local Hugging Face checkpoint directory.

    Reads tokenizer.json, and from tokenizer_config.json (and
    special_tokens_map.json) the bos/eos/pad tokens and the chat template
    (also from chat_template.jinja / chat_template.json, where transformers
    >= 4.43 writes it). With `chat_prompts`, prompts are encoded in the chat
    template (see `format_prompt`).
    """
    import json  # pylint: disable=import-outside-toplevel
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
      raise ValueError(f"checkpoint {path!r} has no tokenizer.json")
    conf = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
      if os.path.isfile(os.path.join(path, name)):
        with open(os.path.join(path, name)) as f:
          conf.update({k: v for k, v in json.load(f).items() if v is not None})
    token = lambda v: v.get("content") if isinstance(v, dict) else v  # AddedToken serialised as a dict
    template = conf.get("chat_template")
    if os.path.isfile(os.path.join(path, "chat_template.jinja")):
      with open(os.path.join(path, "chat_template.jinja")) as f:
        template = f.read()
    elif os.path.isfile(os.path.join(path, "chat_template.json")):
      with open(os.path.join(path, "chat_template.json")) as f:
        template = json.load(f).get("chat_template")
    if isinstance(template, list):  # named templates: use "default"
      named = {t["name"]: t["template"] for t in template}
      if "default" not in named:
        raise ValueError(f"{path}: chat templates {sorted(named)} have no 'default'")
      template = named["default"]
    eos = token(conf.get("eos_token"))
    if not eos:
      raise ValueError(f"{path}: tokenizer_config.json names no eos_token")
    extra = {k: token(v) for k, v in conf.items() if k.endswith("_token") and isinstance(token(v), str)}
    return cls(file, bos=token(conf.get("bos_token")), eos=eos, pad=token(conf.get("pad_token")),
               chat_template=template, extra_tokens=extra, chat_prompts=chat_prompts)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int]) -> str:
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[: ids.index(self.eos_id)]
    return self._tok.decode([i for i in ids if i != self.pad_id and i != self.bos_id])

  def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
    """The checkpoint's jinja chat template rendered for `messages` ([{"role", "content"}, ...]).

    Rendered as transformers does (sandboxed jinja2, trim_blocks, lstrip_blocks,
    the special-token strings as variables). A leading BOS string is removed,
    because `encode_prompts` puts the BOS id in front itself.
    """
    if not self.chat_template:
      raise ValueError("this tokenizer has no chat template")
    if self._compiled_template is None:
      self._compiled_template = _compile_chat_template(self.chat_template)
    variables = {**self._extra_tokens, "bos_token": self.bos_token or "", "eos_token": self.eos_token,
                 "pad_token": self.pad_token}
    text = self._compiled_template.render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                          tools=None, documents=None, **variables)
    if self.bos_token and text.startswith(self.bos_token):
      text = text[len(self.bos_token):]
    return text


def _compile_chat_template(template: str):
  """A chat template compiled in jinja2's immutable sandbox, with transformers' helper functions."""
  try:
    import jinja2  # pylint: disable=import-outside-toplevel
    from jinja2.sandbox import ImmutableSandboxedEnvironment  # pylint: disable=import-outside-toplevel
  except ImportError as e:  # pragma: no cover - optional dependency
    raise ImportError("chat templates need the `jinja2` package (pip install jinja2)") from e
  import datetime  # pylint: disable=import-outside-toplevel
  import json  # pylint: disable=import-outside-toplevel

  def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)

  def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
  env.filters["tojson"] = tojson
  env.globals["raise_exception"] = raise_exception
  env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
  return env.from_string(template)


def chat_prompt(tok: Tokenizer, prompt: str, *, system: str | None = None) -> str:
  """`prompt` as one user turn (after an optional system turn) in `tok`'s chat template, ready for the reply.

  The text goes to `encode_prompts` as a prompt. Raises ValueError when the
  tokenizer has no chat template.
  """
  if not getattr(tok, "chat_template", None):
    raise ValueError("the tokenizer has no chat template (use prompts as they are, or a checkpoint that has one)")
  messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
  return tok.apply_chat_template(messages, add_generation_prompt=True)


def format_prompt(tok: Tokenizer, prompt: str) -> str:
  """A record's prompt as the model sees it: one user turn in the chat template when the tokenizer was made with
  `chat_prompts=True`, else unchanged. `encode_prompts` (and so `encode_pairs`) applies it: the one place."""
  return chat_prompt(tok, prompt) if getattr(tok, "chat_prompts", False) else prompt


def load_tokenizer(path: str | None = None) -> Tokenizer:
  """The byte tokenizer, or the tokenizer file at `path`."""
  return ByteTokenizer() if not path else HFTokenizer(path)


def encode_prompts(tok: Tokenizer, prompts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
  """BOS (if the tokenizer has one) + prompt (`format_prompt`), left-padded to `max_len`; too long is an error.

  Returns tokens [B, max_len] int32 and mask [B, max_len] int32.
  """
  tokens = np.full((len(prompts), max_len), tok.pad_id, np.int32)
  mask = np.zeros((len(prompts), max_len), np.int32)
  for i, p in enumerate(prompts):
    ids = ([tok.bos_id] if tok.bos_id is not None else []) + tok.encode(format_prompt(tok, p))
    if len(ids) > max_len:
      raise ValueError(f"prompt {i} takes {len(ids)} tokens, more than max_len={max_len}: prompts are never "
                       "truncated (filter them first, e.g. rlhf_jax.rollout.fit_records)")
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
