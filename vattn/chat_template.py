"""Chat template application, shared by `LLM.chat` and the server's chat endpoint.

Templates are Jinja, rendered by transformers in its sandbox. A template that fails (a syntax error, a
`raise_exception(...)` about the conversation, an undefined name, a sandbox SecurityError) raises
ChatTemplateError, a ValueError whose message says what failed, without Python reprs.

`sandbox_main` is the body of the child process that renders templates a server does not own (a
client's `chat_template`): it imports only jinja2 and transformers' template helpers, caps its own
address space, and answers one render at a time over a pipe (see vattn/server/template_sandbox.py).
"""

from __future__ import annotations


class ChatTemplateError(ValueError):
    """The chat template could not be rendered for this conversation."""


def check_conversation(conversation: list[dict]) -> None:
    if not conversation:
        raise ValueError("messages must not be empty")
    for m in conversation:
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"each chat message needs 'role' and 'content', got {m!r}")


def template_error(exc: Exception) -> ChatTemplateError:
    """A jinja2 (or other) failure while rendering, as a message for the client."""
    import jinja2

    if isinstance(exc, jinja2.TemplateSyntaxError):
        return ChatTemplateError(f"chat template syntax error (line {exc.lineno}): {exc.message}")
    if isinstance(exc, jinja2.exceptions.SecurityError):
        return ChatTemplateError(f"chat template refused by the sandbox: {exc}")
    if isinstance(exc, jinja2.UndefinedError):
        return ChatTemplateError(f"chat template error: {exc.message}")
    if isinstance(exc, jinja2.TemplateError):  # raise_exception("...") in the template
        return ChatTemplateError(f"chat template error: {exc.message or type(exc).__name__}")
    if isinstance(exc, RecursionError):
        return ChatTemplateError("chat template error: recursion too deep")
    return ChatTemplateError(f"chat template error: {type(exc).__name__}: {exc}")


def render_chat(tokenizer, conversation: list[dict], add_generation_prompt: bool = True,
                chat_template: str | None = None) -> str:
    """Render `conversation` ([{"role", "content"}, ...]) with the tokenizer's (or the given) chat template."""
    if tokenizer.chat_template is None and chat_template is None:
        raise ValueError("this model's tokenizer has no chat template; pass chat_template=...")
    check_conversation(conversation)
    try:
        return tokenizer.apply_chat_template(conversation, tokenize=False, chat_template=chat_template,
                                             add_generation_prompt=add_generation_prompt)
    except MemoryError:
        raise
    except Exception as exc:  # anything a template does wrong surfaces here, jinja2's errors and Python's
        raise template_error(exc) from exc


def encode_chat(tokenizer, conversation: list[dict], add_generation_prompt: bool = True,
                chat_template: str | None = None) -> list[int]:
    """Render `conversation` with the chat template and tokenize it."""
    text = render_chat(tokenizer, conversation, add_generation_prompt, chat_template)
    # the template already carries any special tokens (BOS) it wants
    return tokenizer.encode(text, add_special_tokens=False)


def template_variables(tokenizer) -> dict[str, str]:
    """What apply_chat_template passes a template besides the messages: the special tokens (bos_token, ...)."""
    return {k: str(v) for k, v in tokenizer.special_tokens_map.items() if isinstance(v, str)}


# ---- the sandbox child process -------------------------------------------------------------------


def _address_space() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def sandbox_main(memory_bytes: int) -> None:
    """Child process (`python -c`): render jobs read from stdin, replies written to stdout, as JSON messages.

    A job is [template, conversation, add_generation_prompt, variables, max_chars]; a reply ["ok", text] or
    ["error", message]. The address space is capped at what the process needs after its imports plus
    `memory_bytes`, so `{{ 'x' * 10**10 }}` fails here with MemoryError, not in the server. JSON, not pickle:
    the server never unpickles what a client's template could influence.
    """
    import json
    import os
    import resource
    import sys
    from multiprocessing.connection import Connection

    from transformers.utils.chat_template_utils import render_jinja_template

    reader, writer = Connection(os.dup(0), writable=False), Connection(os.dup(1), readable=False)
    os.dup2(2, 1)  # stray prints go to stderr, never into the reply stream
    sys.stdout = sys.stderr
    limit = _address_space() + memory_bytes
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    writer.send_bytes(b'["ready"]')
    while True:
        try:
            template, conversation, add_generation_prompt, variables, max_chars = json.loads(reader.recv_bytes())
        except (EOFError, OSError):
            return
        try:
            conversation = [{k: v for k, v in m.items() if v is not None} for m in conversation]
            rendered, _ = render_jinja_template(conversations=[conversation], chat_template=template,
                                                add_generation_prompt=add_generation_prompt, **variables)
            text = rendered[0]
            if len(text) > max_chars:
                reply = ["error", f"the chat template rendered {len(text)} characters, more than the {max_chars} "
                                  "a prompt for this model can have"]
            else:
                reply = ["ok", text]
        except MemoryError:
            reply = ["error", "the chat template ran out of memory while rendering"]
        except Exception as exc:
            reply = ["error", str(template_error(exc))]
        try:
            writer.send_bytes(json.dumps(reply).encode("utf-8", "surrogatepass"))
        except MemoryError:
            writer.send_bytes(b'["error", "the chat template ran out of memory while rendering"]')
