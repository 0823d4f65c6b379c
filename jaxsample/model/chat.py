"""Rendering a chat template (the jinja2 source stored in a GGUF file).

The environment is HF transformers' ``apply_chat_template`` one (transformers 5.x,
``utils/chat_template_utils.py``): a sandboxed jinja2 environment with ``trim_blocks`` and
``lstrip_blocks``, the ``loopcontrols`` extension (``{% break %}``, ``{% continue %}``)
and the ``{% generation %}`` block tag (rendered as its body), a ``tojson`` filter that
keeps non-ASCII characters and takes ``indent``, ``separators`` and ``sort_keys``, the
``raise_exception`` and ``strftime_now`` helpers, ``dict`` and ``namespace`` restricted as
HF restricts them (no attributes starting with ``_`` on a namespace), and the variables
``messages``, ``add_generation_prompt``, ``bos_token``, ``eos_token``. A template that
renders under transformers renders the same here.

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


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    """HF's ``tojson``: ``json.dumps`` without jinja2's HTML escaping, non-ASCII kept."""
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _TemplateDict:
    """``dict`` inside templates: builds dicts, exposes nothing else (as in HF)."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


@functools.lru_cache(maxsize=1)
def _environment():
    """The sandboxed environment (built once: the extension and namespace classes import
    jinja2, which the package imports only when a template is rendered)."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlocks(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` renders its body. HF's
        AssistantTracker also records where the block falls (for
        ``return_assistant_tokens_mask``), which nothing here asks for."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            call = self.call_method("_body")
            return jinja2.nodes.CallBlock(call, [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    class TemplateNamespace(jinja2.utils.Namespace):
        """``namespace`` refusing attributes that start with ``_`` (as in HF)."""

        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"a namespace cannot hold attributes starting with '_', got {name!r}"
                )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[GenerationBlocks, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    return env


@functools.lru_cache(maxsize=8)
def _compile(source: str):
    return _environment().from_string(source)


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
