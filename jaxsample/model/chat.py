"""Rendering a chat template (the jinja2 source stored in a GGUF file).

The environment mirrors HF transformers' ``apply_chat_template``: a sandboxed jinja2
environment with ``trim_blocks`` and ``lstrip_blocks``, the ``tojson`` filter that keeps
non-ASCII characters, ``raise_exception`` and ``strftime_now`` helpers, and the variables
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``.

Example::

    render_chat("{% for m in messages %}{{ m['content'] }}{% endfor %}",
                [{"role": "user", "content": "Hi"}])   # 'Hi'
"""

from __future__ import annotations

import datetime
import functools
import json


class ChatTemplateError(ValueError):
    """The messages could not be rendered: the template rejected them (``raise_exception``),
    failed on them (a jinja2 error, a wrong type), could not be compiled, or is missing."""


def _raise(message):
    raise ChatTemplateError(message)


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(source)


def render_chat(
    template: str, messages: list[dict], *, add_generation_prompt: bool = True, **variables
) -> str:
    """Render ``messages`` with the jinja2 ``template``; extra ``variables`` are passed in.

    Every failure is a :class:`ChatTemplateError`, whatever the template does: the template
    is code stored in the model file, and what it raises depends on the messages.

    >>> render_chat("{{ raise_exception('roles must alternate') }}", [])
    Traceback (most recent call last):
    ...
    jaxsample.model.chat.ChatTemplateError: roles must alternate
    """
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ChatTemplateError(
                f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}"
            )
    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, **variables
        )
    except ChatTemplateError:
        raise
    except Exception as err:  # jinja2 errors, TypeError, ... raised by the template's code
        raise ChatTemplateError(f"the chat template failed: {type(err).__name__}: {err}") from err
