"""Templates: ids and label masks against hand-built expectations, with the real Qwen2 tokenizer and a
small trained BPE; the qwen template also against the original's full-string tokenization and its
round-by-round masking rule."""

import dataclasses

import numpy as np
import pytest

import needs
import text_tokenizers
from llavamod_jax.data import templates
from llavamod_jax.data.templates import IGNORE, LLAVA_SYSTEM, Encoder, TemplateError

N_IMG = 5  # image tokens per <image> in these tests


def _bpe():
  return text_tokenizers.trained_bpe()


def _qwen2():
  tok = text_tokenizers.qwen2()
  if tok is None:
    needs.missing("../shared/assets/qwen2-tokenizer", "the shared folder beside the repository")
  return tok


@pytest.fixture(params=["qwen2", "bpe"])
def tok(request):
  return _qwen2() if request.param == "qwen2" else _bpe()


def _image_id(tok):
  # Qwen2 LLaVA checkpoints append <image> after the vocabulary; the BPE has it as a special token.
  token_id = tok.convert_tokens_to_ids("<image>")
  return len(tok) if token_id is None else token_id


def _t(tok, text):
  return tok(text, add_special_tokens=False)["input_ids"]


def _sid(tok, token):
  return tok.convert_tokens_to_ids(token)


def _trained_text(tok, enc):
  """Decoded trained spans, one string per contiguous run of trained labels."""
  trained = enc.labels != IGNORE
  runs, current = [], []
  for t, keep in zip(enc.labels, trained):
    if keep:
      current.append(int(t))
    elif current:
      runs.append(current)
      current = []
  if current:
    runs.append(current)
  return [tok.decode(r) for r in runs]


def _check(enc, expected_ids, expected_trained):
  np.testing.assert_array_equal(enc.input_ids, np.asarray(expected_ids, np.int32))
  np.testing.assert_array_equal(enc.labels, np.where(expected_trained, expected_ids, IGNORE))
  assert enc.input_ids.dtype == np.int32 and enc.labels.dtype == np.int32


def test_qwen_single_turn_image_first(tok):
  img = _image_id(tok)
  enc = Encoder(tok, "qwen").encode([("user", "<image>\nWhat is in the image?"),
                                     ("assistant", "A red circle.")],
                                    image_token_id=img, num_image_tokens=N_IMG, num_images=1)
  prompt = (_t(tok, LLAVA_SYSTEM + " USER: ") + [img] * N_IMG
            + _t(tok, "\nWhat is in the image? ASSISTANT:"))
  answer = _t(tok, " A red circle.") + [_sid(tok, "<|endoftext|>")]
  _check(enc, prompt + answer, [False] * len(prompt) + [True] * len(answer))
  assert enc.num_images == 1 and not enc.truncated
  assert _trained_text(tok, enc) == [" A red circle.<|endoftext|>"]


def test_qwen_multi_turn_image_in_middle(tok):
  img = _image_id(tok)
  messages = [("user", "Look at this <image> picture. What shape?"), ("assistant", "A star."),
              ("user", "And its colour?"), ("assistant", "Blue.")]
  enc = Encoder(tok, "qwen").encode(messages, image_token_id=img, num_image_tokens=N_IMG)
  eos = _sid(tok, "<|endoftext|>")
  p1 = (_t(tok, LLAVA_SYSTEM + " USER: Look at this ") + [img] * N_IMG
        + _t(tok, " picture. What shape? ASSISTANT:"))
  a1 = _t(tok, " A star.") + [eos]
  p2 = _t(tok, "USER: And its colour? ASSISTANT:")
  a2 = _t(tok, " Blue.") + [eos]
  _check(enc, p1 + a1 + p2 + a2, [False] * len(p1) + [True] * len(a1) + [False] * len(p2)
         + [True] * len(a2))
  assert _trained_text(tok, enc) == [" A star.<|endoftext|>", " Blue.<|endoftext|>"]


def _original_qwen_reference(tok, turns):
  """The original LLaVA-MoD procedure for its "qwen" (= phi, SeparatorStyle.TWO) template on text-only
  data: tokenize the whole prompt string; per round (split at <|endoftext|>) mask
  len(tokenize("... ASSISTANT: ")) - 1 tokens and advance by len(tokenize(round)) + 1."""
  text = LLAVA_SYSTEM + " "
  for j in range(0, len(turns), 2):
    text += f"USER: {turns[j]} ASSISTANT: {turns[j + 1]}<|endoftext|>"
  ids = _t(tok, text)
  labels = list(ids)
  cur = 0
  for rnd in text.split("<|endoftext|>"):
    if not rnd:
      break
    head, _ = rnd.split(" ASSISTANT: ")
    instruction_len = len(_t(tok, head + " ASSISTANT: ")) - 1
    labels[cur:cur + instruction_len] = [IGNORE] * instruction_len
    cur += len(_t(tok, rnd)) + 1
  return ids, labels


def test_qwen_matches_the_original_full_string_procedure():
  tok = _qwen2()
  turns = ["What colour is the square?", "The square is green.", "How many stars?",
           "There are 2 stars, both yellow."]
  ids, labels = _original_qwen_reference(tok, turns)
  messages = [("user" if j % 2 == 0 else "assistant", t) for j, t in enumerate(turns)]
  enc = Encoder(tok, "qwen").encode(messages, image_token_id=151646, num_image_tokens=N_IMG)
  np.testing.assert_array_equal(enc.input_ids, ids)
  np.testing.assert_array_equal(enc.labels, labels)


def test_chatml(tok):
  img = _image_id(tok)
  messages = [("user", "<image>\nDescribe it."), ("assistant", "Two triangles."),
              ("user", "Any circles?"), ("assistant", "No.")]
  enc = Encoder(tok, "chatml").encode(messages, image_token_id=img, num_image_tokens=N_IMG)
  s, e, nl = _sid(tok, "<|im_start|>"), _sid(tok, "<|im_end|>"), _t(tok, "\n")
  p1 = ([s] + _t(tok, "system\nYou are a helpful assistant.") + [e] + nl + [s] + _t(tok, "user\n")
        + [img] * N_IMG + _t(tok, "\nDescribe it.") + [e] + nl + [s] + _t(tok, "assistant\n"))
  a1 = _t(tok, "Two triangles.") + [e]
  p2 = nl + [s] + _t(tok, "user\nAny circles?") + [e] + nl + [s] + _t(tok, "assistant\n")
  a2 = _t(tok, "No.") + [e]
  ids = p1 + a1 + p2 + a2 + nl
  trained = ([False] * len(p1) + [True] * len(a1) + [False] * len(p2) + [True] * len(a2)
             + [False] * len(nl))
  _check(enc, ids, trained)
  assert _trained_text(tok, enc) == ["Two triangles.<|im_end|>", "No.<|im_end|>"]


def test_chatml_equals_the_qwen2_instruct_string():
  tok = _qwen2()
  messages = [("system", "Be brief."), ("user", "Hi there"), ("assistant", "Hello!")]
  enc = Encoder(tok, "chatml").encode(messages, image_token_id=151646, num_image_tokens=N_IMG)
  text = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi there<|im_end|>\n"
          "<|im_start|>assistant\nHello!<|im_end|>\n")
  np.testing.assert_array_equal(enc.input_ids, _t(tok, text))
  assert _trained_text(tok, enc) == ["Hello!<|im_end|>"]


def test_plain_caption(tok):
  img = _image_id(tok)
  enc = Encoder(tok, "plain").encode([("user", "<image>\nRender a short caption."),
                                      ("assistant", "A yellow star on grey.")],
                                     image_token_id=img, num_image_tokens=N_IMG, num_images=1)
  caption = _t(tok, "A yellow star on grey.") + [_sid(tok, "<|endoftext|>")]
  _check(enc, [img] * N_IMG + caption, [False] * N_IMG + [True] * len(caption))
  assert _trained_text(tok, enc) == ["A yellow star on grey.<|endoftext|>"]


def test_system_message_replaces_the_default(tok):
  enc = Encoder(tok, "qwen").encode([("system", "Be brief."), ("user", "Hi"), ("assistant", "Yes.")],
                                    image_token_id=_image_id(tok), num_image_tokens=N_IMG)
  prompt = _t(tok, "Be brief. USER: Hi ASSISTANT:")
  answer = _t(tok, " Yes.") + [_sid(tok, "<|endoftext|>")]
  _check(enc, prompt + answer, [False] * len(prompt) + [True] * len(answer))


def test_image_expansion_is_a_parameter_and_never_bpe(tok):
  img = _image_id(tok)
  enc = Encoder(tok, "qwen")
  messages = [("user", "<image><image>\nCompare."), ("assistant", "Same.")]
  a = enc.encode(messages, image_token_id=img, num_image_tokens=3)
  b = enc.encode(messages, image_token_id=img, num_image_tokens=7)
  assert (a.input_ids == img).sum() == 6 and (b.input_ids == img).sum() == 14
  assert a.num_images == b.num_images == 2
  np.testing.assert_array_equal(a.input_ids[a.input_ids != img], b.input_ids[b.input_ids != img])
  assert not np.any(a.labels == img)


def test_truncation(tok):
  img = _image_id(tok)
  enc = Encoder(tok, "qwen")
  messages = [("user", "<image>\nWhat is it?"), ("assistant", "A red circle and a blue square.")]
  full = enc.encode(messages, image_token_id=img, num_image_tokens=N_IMG)
  first_trained = int(np.argmax(full.labels != IGNORE))
  cut = enc.encode(messages, image_token_id=img, num_image_tokens=N_IMG, max_length=first_trained + 2)
  assert cut.truncated and cut.input_ids.size == first_trained + 2 and cut.num_images == 1
  np.testing.assert_array_equal(cut.input_ids, full.input_ids[:first_trained + 2])
  np.testing.assert_array_equal(cut.labels, full.labels[:first_trained + 2])
  assert (cut.labels != IGNORE).sum() == 2
  with pytest.raises(TemplateError) as e:
    enc.encode(messages, image_token_id=img, num_image_tokens=N_IMG, max_length=first_trained)
  assert e.value.reason == "truncated_no_target"
  same = enc.encode(messages, image_token_id=img, num_image_tokens=N_IMG, max_length=full.input_ids.size)
  assert not same.truncated


def test_truncation_never_splits_an_image(tok):
  img = _image_id(tok)
  enc = Encoder(tok, "qwen")
  messages = [("user", "<image>\nFirst."), ("assistant", "One."), ("user", "<image>\nSecond."),
              ("assistant", "Two.")]
  full = enc.encode(messages, image_token_id=img, num_image_tokens=N_IMG)
  second = int(np.flatnonzero(full.input_ids == img)[N_IMG])  # first token of the second image
  cut = enc.encode(messages, image_token_id=img, num_image_tokens=N_IMG, max_length=second + 2)
  assert cut.truncated and cut.num_images == 1 and cut.input_ids.size == second
  np.testing.assert_array_equal(cut.input_ids, full.input_ids[:second])
  assert _trained_text(tok, cut) == [" One.<|endoftext|>"]


def test_preference_pair(tok):
  img = _image_id(tok)
  enc = Encoder(tok, "qwen")
  prompt_msgs = [("user", "<image>\nName the shape."), ("assistant", "A star."), ("user", "Colour?")]
  chosen, rejected = enc.encode_preference(prompt_msgs, "Yellow.", "Purple and green.",
                                           image_token_id=img, num_image_tokens=N_IMG)
  prompt = enc.encode_prompt(prompt_msgs, image_token_id=img, num_image_tokens=N_IMG)
  for enc_, answer in [(chosen, " Yellow."), (rejected, " Purple and green.")]:
    np.testing.assert_array_equal(enc_.input_ids[:prompt.size], prompt)
    assert (enc_.labels[:prompt.size] == IGNORE).all()  # earlier assistant turns are prompt here
    assert _trained_text(tok, enc_) == [answer + "<|endoftext|>"]
  assert tok.decode(prompt[prompt != img]).endswith("USER: Colour? ASSISTANT:")


def test_errors():
  tok = _bpe()
  img = _image_id(tok)
  enc = Encoder(tok, "qwen")
  with pytest.raises(TemplateError) as e:
    enc.encode([("user", "<image>\nHi"), ("assistant", "Yo.")], image_token_id=img,
               num_image_tokens=2, num_images=2)
  assert e.value.reason == "image_count_mismatch"
  with pytest.raises(TemplateError) as e:
    enc.encode([("user", "Hi"), ("assistant", "See <image>")], image_token_id=img, num_image_tokens=2)
  assert e.value.reason == "image_in_response"
  with pytest.raises(TemplateError) as e:
    enc.encode([("user", "Hi")], image_token_id=img, num_image_tokens=2)
  assert e.value.reason == "no_assistant_turn"
  user_id = _t(tok, "USER")[0]
  with pytest.raises(TemplateError) as e:  # an image id that collides with a text token
    enc.encode([("user", "Hi"), ("assistant", "Yo.")], image_token_id=user_id, num_image_tokens=2)
  assert e.value.reason == "image_token_in_text"
  odd = dataclasses.replace(templates.TEMPLATES["qwen"], assistant_end="<|eot|>",
                            specials=("<|eot|>",))
  with pytest.raises(ValueError, match="<\\|eot\\|>"):
    Encoder(tok, odd)
  with pytest.raises(ValueError, match="unknown template"):
    templates.get("vicuna")
