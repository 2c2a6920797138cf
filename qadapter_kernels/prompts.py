"""How a prompt becomes token ids: one rule for training, decoding and evaluation.

A prompt is a string or a conversation (a list of ``{"role", "content"}`` messages). With a chat
template it is rendered with the generation prompt and exactly one BOS; without, it is the text with
one BOS when the tokenizer uses one. Generation feeds these ids, so an adapter decodes from the
states it was trained on. Needs only a tokenizer (no torch, no transformers import).
"""
from __future__ import annotations

import hashlib
import warnings
from typing import Union

__all__ = ["FORMAT_CHAT_TEMPLATES", "HH_ASSISTANT_MARKER", "HH_HUMAN_MARKER", "PROMPT_FORMATS", "Message", "Turns", "bos_token_id",
           "chat_template_sha256", "encode_prompt", "encode_prompt_with_bos", "in_trained_format", "is_preformatted",
           "prompt_format", "render_chat", "with_one_bos"]

Message = dict[str, str]
Turns = Union[str, list[Message]]

# The turn markers of Anthropic HH-RLHF's raw text ("\n\nHuman: ...\n\nAssistant: ...").
HH_HUMAN_MARKER = "\n\nHuman: "
HH_ASSISTANT_MARKER = "\n\nAssistant:"

# How prompts reach the model: through the tokenizer's chat template, as HH-RLHF dialogue text, or as
# plain text (a tokenizer without a chat template). A saved adapter records the format it was trained on.
PROMPT_FORMATS = ("chat_template", "hh_dialogue", "plain_text")
# Chat templates that write a conversation in the other two formats, for what renders conversations
# itself (lm-eval's apply_chat_template, vLLM's chat endpoint). One line each, as vLLM's --chat-template
# takes them; Jinja turns the backslash-n escapes into newlines.
FORMAT_CHAT_TEMPLATES = {
    "hh_dialogue": ("{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '\\n\\nAssistant: ' + m['content'] }}"
                    "{% elif m['role'] == 'user' %}{{ '\\n\\nHuman: ' + m['content'] }}{% else %}{{ m['content'] }}"
                    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"),
    "plain_text": "{% for m in messages %}{{ m['content'] }}{% if not loop.last %}{{ '\\n' }}{% endif %}{% endfor %}",
}


def is_preformatted(prompt: Turns) -> bool:
    """Whether a string prompt is dialogue text already in HH-RLHF's format (it ends with the
    ``"\\n\\nAssistant:"`` marker): it is encoded as plain text even with a chat template, since
    wrapping it in one would nest two dialogue formats."""
    return isinstance(prompt, str) and prompt.rstrip().endswith(HH_ASSISTANT_MARKER)


def bos_token_id(tokenizer) -> int | None:
    """The BOS id the tokenizer puts in front of a plain text it encodes (None: it puts none).
    It costs a tokenizer call: ask once per pair or batch."""
    bos = tokenizer.bos_token_id
    ids = tokenizer("a")["input_ids"]
    return bos if bos is not None and ids[:1] == [bos] else None


def with_one_bos(ids: list[int], bos: int | None) -> list[int]:
    """``ids`` starting with ``bos`` (added when missing; unchanged when ``bos`` is None)."""
    if bos is not None and ids[:1] != [bos]:
        return [bos, *ids]
    return ids


def render_chat(tokenizer, messages: list[Message], add_generation_prompt: bool, bos: int | None) -> list[int]:
    """The token ids of ``messages`` through the tokenizer's chat template, with exactly one ``bos``."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    # The template writes its own special tokens (BOS included, when it has one): encoding with
    # add_special_tokens=True would add a second BOS, the authors' pitfall. A template without
    # BOS for a tokenizer that uses one gets exactly one.
    return with_one_bos(tokenizer(text, add_special_tokens=False)["input_ids"], bos)


def encode_prompt(prompt: Turns, tokenizer) -> list[int]:
    """The token ids of a prompt exactly as training sees it before a response.

    With a chat template: the conversation (a plain string becomes one user turn) rendered with
    ``add_generation_prompt=True``, one BOS. Without: the text with one BOS when the tokenizer
    uses one. A string already in HH-RLHF's dialogue format (``is_preformatted``: it ends
    with ``"\n\nAssistant:"``) is plain text even with a chat template. Generation feeds these
    ids, so the adapter decodes from the states it was trained on.
    """
    return encode_prompt_with_bos(prompt, tokenizer, bos_token_id(tokenizer))


def encode_prompt_with_bos(prompt: Turns, tokenizer, bos: int | None) -> list[int]:
    """``encode_prompt`` with the tokenizer's ``bos_token_id`` already known."""
    if getattr(tokenizer, "chat_template", None) and not is_preformatted(prompt) and not isinstance(prompt, _PlainText):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return render_chat(tokenizer, messages, True, bos)
    if not isinstance(prompt, str):
        raise ValueError("conversational prompts need a tokenizer with a chat template")
    return with_one_bos(tokenizer(prompt, add_special_tokens=False)["input_ids"], bos)


def prompt_format(prompt: Turns, tokenizer) -> str:
    """The entry of ``PROMPT_FORMATS`` that ``encode_prompt`` uses for ``prompt`` with ``tokenizer``."""
    if is_preformatted(prompt):
        return "hh_dialogue"
    return "chat_template" if getattr(tokenizer, "chat_template", None) else "plain_text"


def chat_template_sha256(tokenizer) -> str | None:
    """The SHA-256 of the tokenizer's chat template text (None: it has none); tells two templates apart."""
    template = getattr(tokenizer, "chat_template", None)
    return hashlib.sha256(template.encode()).hexdigest() if isinstance(template, str) else None


def in_trained_format(prompt: Turns, tokenizer, trained: str | None, trained_sha256: str | None = None) -> Turns:
    """``prompt`` as an adapter trained on ``trained`` prompts (an entry of ``PROMPT_FORMATS``; None: not
    recorded, nothing changes) saw them, ready for ``encode_prompt``.

    A bare question becomes one HH-RLHF turn (``"\\n\\nHuman: ...\\n\\nAssistant:"``) for an adapter trained
    on HH dialogue; for one trained on plain text it stays plain text even where the tokenizer has a chat
    template. A prompt that is itself in another format (a conversation, or dialogue text, given to an
    adapter trained otherwise) is kept as it is, with a warning naming both formats; so is a chat template
    whose hash differs from ``trained_sha256``.
    """
    if trained is None:
        return prompt
    if trained not in PROMPT_FORMATS:
        raise ValueError(f"the prompt format must be one of {PROMPT_FORMATS}, got {trained!r}")
    given = prompt_format(prompt, tokenizer)
    if isinstance(prompt, str) and not is_preformatted(prompt):
        if trained == "hh_dialogue":
            return f"{HH_HUMAN_MARKER}{prompt}{HH_ASSISTANT_MARKER}"
        if trained == "plain_text":
            return _PlainText(prompt)
        given = "chat_template" if getattr(tokenizer, "chat_template", None) else "plain_text"
    if given != trained:
        warnings.warn(f"the adapter was trained on prompts in the {trained} format, this prompt is in the {given} "
                      "format: its answers may not show what the adapter learnt", UserWarning, stacklevel=3)
    elif given == "chat_template" and trained_sha256 and chat_template_sha256(tokenizer) != trained_sha256:
        warnings.warn(f"the adapter was trained with a chat template of SHA-256 {trained_sha256[:12]}..., this "
                      f"tokenizer's is {chat_template_sha256(tokenizer)[:12]}...: the prompts differ from training",
                      UserWarning, stacklevel=3)
    return prompt


class _PlainText(str):
    """A prompt string to be encoded as plain text even where the tokenizer has a chat template."""
