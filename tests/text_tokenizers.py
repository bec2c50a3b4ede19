"""Tokenizers for data tests: a small byte-level BPE trained on the spot, and the real Qwen2 one."""

from __future__ import annotations

import functools
from pathlib import Path

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]
# ../shared beside the repository (CI lays it out the same way).
QWEN2_DIR = Path(__file__).resolve().parents[1] / ".." / "shared" / "assets" / "qwen2-tokenizer"

_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What is in the image? ASSISTANT: A red circle and a blue square.",
    "How many shapes are there? There are three shapes: two triangles and one star.",
    "Is there a green triangle in the picture? Yes. No. Describe the image briefly.",
    "system user assistant You are a helpful assistant.",
] * 20


@functools.lru_cache(maxsize=None)
def trained_bpe():
  """A byte-level BPE (vocabulary ~400) wrapped as a transformers fast tokenizer; its special tokens
  are SPECIALS. The image token is a vocabulary entry here, as in LLaVA checkpoints."""
  import tokenizers
  import transformers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(_CORPUS, trainer)
  return transformers.PreTrainedTokenizerFast(
      tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
      additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>"])


@functools.lru_cache(maxsize=None)
def qwen2():
  """The real Qwen2 tokenizer, or None when ../shared/assets is absent."""
  if not (QWEN2_DIR / "vocab.json").is_file():
    return None
  import transformers
  return transformers.AutoTokenizer.from_pretrained(str(QWEN2_DIR.resolve()))
