"""export: the chat template renders each of our templates as `templates.Encoder` tokenizes it."""

import pytest

import tiny_run
from llavamod_jax import export
from llavamod_jax.data import templates

CONVERSATION = [("user", "<image>\nWhat color is the circle?"), ("assistant", "Red."),
                ("user", "How many shapes are there?"), ("assistant", "3")]


def _hf_messages(messages):
  """Our (role, text) turns as HF chat messages, images as {"type": "image"} items."""
  out = []
  for role, text in messages:
    if role == "user" and text.startswith("<image>\n"):
      content = [{"type": "image"}, {"type": "text", "text": text.removeprefix("<image>\n")}]
    else:
      content = text
    out.append({"role": role, "content": content})
  return out


@pytest.mark.parametrize("name", sorted(templates.TEMPLATES))
@pytest.mark.parametrize("system", [None, "Answer briefly."])
def test_chat_template_matches_the_encoder(name, system):
  tok = tiny_run.tokenizer()
  enc = templates.Encoder(tok, name)
  image_id = tok.convert_tokens_to_ids("<image>")
  messages = ([("system", system)] if system else []) + CONVERSATION
  chat = export.chat_template(name)

  def render(msgs, **kw):
    text = tok.apply_chat_template(_hf_messages(msgs), chat_template=chat, tokenize=False, **kw)
    return tok(text, add_special_tokens=False)["input_ids"]

  want = enc.encode(messages, image_token_id=image_id, num_image_tokens=1).input_ids.tolist()
  assert render(messages) == want
  want = enc.encode_prompt(messages[:-1], image_token_id=image_id, num_image_tokens=1).tolist()
  assert render(messages[:-1], add_generation_prompt=True) == want
  # Plain string contents render like content lists.
  as_strings = [{"role": r, "content": t} for r, t in messages]
  text = tok.apply_chat_template(as_strings, chat_template=chat, tokenize=False)
  assert tok(text, add_special_tokens=False)["input_ids"] == render(messages)
