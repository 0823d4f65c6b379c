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
    """The chat template rejected the messages (``raise_exception`` in the template)."""


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
    """Render ``messages`` with the jinja2 ``template``; extra ``variables`` are passed in."""
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r}")
    return _compile(template).render(
        messages=messages, add_generation_prompt=add_generation_prompt, **variables
    )
