"""Renders chat messages into a prompt with the model's chat template, as transformers'
``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)`` does.

Templates come with checkpoints, so they are untrusted code: they run in jinja2's immutable
sandbox, with the environment and helpers transformers gives them (trim_blocks, lstrip_blocks,
loop controls, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape HTML,
``dict`` and a ``namespace`` that refuses underscore names, ``{% generation %}`` blocks) and the
variables it passes (``messages``, ``add_generation_prompt``, ``tools`` and ``documents`` as
None, and the special tokens' text). Torch-free.
"""

from __future__ import annotations

import json
from datetime import datetime

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

ROLES = ("system", "user", "assistant", "tool")
"""The roles a message may have."""


class ChatTemplateError(ValueError):
    """The template does not compile, or it refused (or failed on) the messages."""


def _raise_exception(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


class _TemplateDict:
    """`dict(...)` and `dict.fromkeys(...)` for templates, without the dict type itself (whose
    attributes a template could otherwise reach)."""

    def __call__(self, *args, **kwargs) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace, refusing attributes that start with an underscore."""

    def __init__(*args, **kwargs):  # jinja2's signature trick, so that namespace(self=...) works
        self, args = args[0], args[1:]
        attributes = dict(*args, **kwargs)
        for name in attributes:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attributes)

    def __setitem__(self, name, value) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace attribute may not start with an underscore: {name!r}")


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers marks the assistant's tokens with
    it, for training): rendered as its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> list[jinja2.nodes.Node]:
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


def _environment() -> ImmutableSandboxedEnvironment:
    environment = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, dict=_TemplateDict(), namespace=_Namespace)
    return environment


_ENVIRONMENT = _environment()


class ChatTemplate:
    """A model's chat template with its special tokens' text (None where the model names none,
    as transformers leaves such a variable undefined)."""

    def __init__(self, source: str, bos_token: str | None = None, eos_token: str | None = None) -> None:
        self.compile_error: str | None = None
        """Why the template does not compile (then every render raises it), else None."""
        try:
            self._template = _ENVIRONMENT.from_string(source)
        except jinja2.TemplateSyntaxError as error:
            self.compile_error = f"the model's chat template does not compile: {error}"
        self._special_tokens = {name: text for name, text in (("bos_token", bos_token), ("eos_token", eos_token)) if text}

    def render(self, messages: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The prompt for `messages` (each a dict with "role" and "content"), ending with the
        start of the assistant's turn when add_generation_prompt. Raises ChatTemplateError
        with the template's own message when it refuses or fails on them."""
        if self.compile_error is not None:
            raise ChatTemplateError(self.compile_error)
        try:
            return self._template.render(
                messages=[dict(message) for message in messages],
                tools=None,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self._special_tokens,
            )
        except Exception as error:  # a template is code: any error it raises is about the messages it was given
            raise ChatTemplateError(f"the model's chat template failed on these messages: {error}") from None
