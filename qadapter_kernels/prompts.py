"""How a prompt becomes token ids: one rule for training, decoding and evaluation.

A prompt is a string or a conversation (a list of ``{"role", "content"}`` messages). With a chat
template it is rendered with the generation prompt and exactly one BOS; without, it is the text with
one BOS when the tokenizer uses one. Generation feeds these ids, so an adapter decodes from the
states it was trained on. Needs only a tokenizer (no torch, no transformers import).
"""
from __future__ import annotations

from typing import Union

__all__ = ["HH_ASSISTANT_MARKER", "Message", "Turns", "bos_token_id", "encode_prompt", "encode_prompt_with_bos",
           "is_preformatted", "render_chat", "with_one_bos"]

Message = dict[str, str]
Turns = Union[str, list[Message]]

# The turn marker of Anthropic HH-RLHF's raw text ("\n\nHuman: ...\n\nAssistant: ...").
HH_ASSISTANT_MARKER = "\n\nAssistant:"


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
    if getattr(tokenizer, "chat_template", None) and not is_preformatted(prompt):
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return render_chat(tokenizer, messages, True, bos)
    if not isinstance(prompt, str):
        raise ValueError("conversational prompts need a tokenizer with a chat template")
    return with_one_bos(tokenizer(prompt, add_special_tokens=False)["input_ids"], bos)
