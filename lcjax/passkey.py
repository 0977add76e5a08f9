"""Passkey retrieval (Mohtashami & Jaggi 2023, arXiv 2305.16300): can the model find one line
hidden in filler text?

A prompt is an instruction, repeated filler sentences, "The pass key is NNNNN. Remember it. NNNNN
is the pass key." at a relative depth of the filler (0 = first, 1 = last), then the question.
Keys come from a seeded RNG, so the prompts are the same on every machine. The model must
greedily generate the digits; a trial is right when the first number it writes is the key.
"""
import re

import numpy as np

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and "
         "memorize it. I will quiz you about the important information there. ")
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
          "There and back again. ")
QUESTION = "What is the pass key? The pass key is"
KEY_DIGITS = 5
NEW_TOKENS = KEY_DIGITS + 3  # room for a space or a token that splits the digits


def needle(key: int) -> str:
  return f"The pass key is {key}. Remember it. {key} is the pass key. "


def make_prompt(tokenizer, length: int, depth: float, key: int) -> tuple[list, int]:
  """(token ids of a prompt of about `length` tokens, BOS first; the index of the needle's first
  token): the needle after round(depth * n) of the n filler sentences that fill the length."""
  if not 0 <= depth <= 1:
    raise ValueError(f"passkey depth must be in [0, 1]; got {depth}")
  sentences = [s + ". " for s in FILLER.split(". ") if s.strip()]
  fixed = len(tokenizer.encode(INTRO + needle(key) + QUESTION)) + 1
  per_round = len(tokenizer.encode(FILLER))
  n = max(0, (length - fixed) * len(sentences) // per_round)
  filler = [sentences[i % len(sentences)].strip() + " " for i in range(n)]
  before = INTRO + "".join(filler[:round(depth * n)])
  text = before + needle(key) + "".join(filler[round(depth * n):]) + QUESTION
  ids = [tokenizer.bos_id] + tokenizer.encode(text).tolist()
  return ids, 1 + len(tokenizer.encode(before))


def keys(seed: int, count: int) -> list:
  """`count` keys of KEY_DIGITS digits (no leading zero) from a seeded RNG."""
  rng = np.random.default_rng(seed)
  return [int(k) for k in rng.integers(10 ** (KEY_DIGITS - 1), 10 ** KEY_DIGITS, count)]


def is_correct(generated: str, key: int) -> bool:
  """Whether the first number in `generated` is the key."""
  match = re.search(r"\d+", generated)
  return match is not None and match.group() == str(key)


def evaluate(generate_fn, tokenizer, lengths, depths, *, trials: int = 2, seed: int = 0) -> dict:
  """{"lengths", "depths", "accuracy" [len(lengths)][len(depths)], "prompt_tokens" per length}.
  generate_fn(prompts: list of token-id lists, num_tokens) -> list of generated texts; it is
  called once per length with every depth and trial of that length."""
  accuracy, prompt_tokens = [], []
  for i, length in enumerate(lengths):
    cells = [(d, k) for d in depths for k in keys(seed * 1000 + i, trials)]
    prompts = [make_prompt(tokenizer, length, d, k)[0] for d, k in cells]
    texts = generate_fn(prompts, NEW_TOKENS)
    right = np.array([is_correct(t, k) for t, (_, k) in zip(texts, cells)], float)
    accuracy.append(right.reshape(len(depths), trials).mean(axis=1).tolist())
    prompt_tokens.append(max(map(len, prompts)))
  return {"lengths": list(lengths), "depths": list(depths), "accuracy": accuracy,
          "prompt_tokens": prompt_tokens, "trials": trials}
