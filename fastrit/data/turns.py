"""How a model's turn is framed: which prompt template a tokenizer gets by default, and which tokens end an answer.

- :func:`resolve_template`: ``None`` means the tokenizer's chat template when it has one (an instruct model is
  asked as it was tuned to be asked), else :data:`fastrit.data.prompts.DEFAULT_TEMPLATE`.
- :func:`end_token_id`: the one token that closes a training target, so that a tuned model stops: the chat
  template's end-of-turn token for chat prompts (``<|im_end|>``, ``<|eot_id|>``, ``<end_of_turn>``, ...), else
  the end-of-sequence token.
- :func:`stop_token_ids`: every token that ends generation (the end-of-sequence token, the model's
  ``generation_config.eos_token_id``, and the chat template's end-of-turn token).
"""

from __future__ import annotations

__all__ = ["CHAT", "end_token_id", "resolve_template", "stop_token_ids"]

#: the template name that asks for the tokenizer's chat template
CHAT = "chat"

# End-of-turn tokens of the chat templates of common families, in the order they are looked for.
_END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(tokenizer, template: str | None) -> str:
    """The template prompts are built with: ``template`` itself, or for ``None`` ``"chat"`` when ``tokenizer`` has
    a chat template, else the plain default template (a format string with ``{passages}`` and ``{question}``)."""
    if template is not None:
        return template
    if has_chat_template(tokenizer):
        return CHAT
    from .prompts import DEFAULT_TEMPLATE

    return DEFAULT_TEMPLATE


def _single_token(tokenizer, text: str) -> int | None:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0] if len(ids) == 1 else None


def _chat_end_of_turn(tokenizer) -> int | None:
    """The token the chat template writes right after an assistant message, when it is a single special token."""
    if not has_chat_template(tokenizer):
        return None
    source = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else str(tokenizer.chat_template)
    for text in _END_OF_TURN:
        if text in source:
            token = _single_token(tokenizer, text)
            if token is not None:
                return token
    return None


def end_token_id(tokenizer, template: str | None) -> int | None:
    """The token that closes an answer target under ``template`` (resolved as :func:`resolve_template` does): the
    chat template's end-of-turn token for ``"chat"``, else ``tokenizer.eos_token_id``; None when there is none."""
    if resolve_template(tokenizer, template) == CHAT:
        token = _chat_end_of_turn(tokenizer)
        if token is not None:
            return token
    return tokenizer.eos_token_id


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """Every token id that ends a generated answer: ``tokenizer.eos_token_id``, ``model.generation_config``'s
    ``eos_token_id`` (an int or a list) and the chat template's end-of-turn token; sorted, without repeats."""
    found: set[int] = set()
    if tokenizer.eos_token_id is not None:
        found.add(int(tokenizer.eos_token_id))
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if isinstance(config_eos, int):
        found.add(config_eos)
    elif isinstance(config_eos, list | tuple):
        found.update(int(token) for token in config_eos)
    turn = _chat_end_of_turn(tokenizer)
    if turn is not None:
        found.add(turn)
    return sorted(found)
