"""Chat template application, shared by `LLM.chat` and the server's chat endpoint."""

from __future__ import annotations


def encode_chat(tokenizer, conversation: list[dict], add_generation_prompt: bool = True,
                chat_template: str | None = None) -> list[int]:
    """Render `conversation` ([{"role", "content"}, ...]) with the tokenizer's chat template and tokenize it."""
    if tokenizer.chat_template is None and chat_template is None:
        raise ValueError("this model's tokenizer has no chat template; pass chat_template=...")
    if not conversation:
        raise ValueError("messages must not be empty")
    for m in conversation:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each chat message needs 'role' and 'content', got {m!r}")
    text = tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template,
                                         add_generation_prompt=add_generation_prompt)
    # the template already carries any special tokens (BOS) it wants
    return tokenizer.encode(text, add_special_tokens=False)
