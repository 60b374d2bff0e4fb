"""The Jinja syntax chat templates are compiled with: the engine checks a template with the same syntax
the API process renders it with, so a template one side accepts the other never refuses."""

from __future__ import annotations

from typing import Any

import jinja2
import jinja2.ext
from jinja2 import nodes


class GenerationBlock(jinja2.ext.Extension):
    """Accepts `{% generation %}...{% endgeneration %}` (Hugging Face's assistant masks for training) and
    renders the body unchanged, so templates that contain it still compile."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


# Hugging Face's chat-template environment: {% generation %} and {% break %}/{% continue %}.
TEMPLATE_EXTENSIONS: tuple[type[jinja2.ext.Extension], ...] = (GenerationBlock, jinja2.ext.loopcontrols)
