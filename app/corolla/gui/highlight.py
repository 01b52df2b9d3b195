"""Syntax colours for code blocks in the transcript, from Pygments (optional: without it, or for a
language it does not know, code is shown in one colour)."""

from __future__ import annotations

from functools import lru_cache

try:
    from pygments.lexers import get_lexer_by_name
    from pygments.styles import get_style_by_name
    from pygments.util import ClassNotFound
except ImportError:  # the window works without it
    get_lexer_by_name = None

LIGHT_STYLE, DARK_STYLE = "default", "monokai"


@lru_cache(maxsize=64)
def _lexer(language: str):
    try:
        return get_lexer_by_name(language, stripnl=False, ensurenl=False)
    except ClassNotFound:
        return None


@lru_cache(maxsize=4)
def _style(dark: bool):
    return get_style_by_name(DARK_STYLE if dark else LIGHT_STYLE)


def highlight(code: str, language: str, dark: bool) -> list[tuple[str, str | None, bool, bool]]:
    """[(text, colour "#rrggbb" or None for the default, bold, italic)] covering `code` exactly; one
    uncoloured run when the language is unknown (an unlabelled block is not guessed at: a wrong guess
    colours prose as code)."""
    name = (language or "").strip().split()[0].lower() if (language or "").strip() else ""
    lexer = _lexer(name) if name and get_lexer_by_name is not None else None
    if lexer is None:
        return [(code, None, False, False)]
    style = _style(dark)
    runs: list[tuple[str, str | None, bool, bool]] = []
    for token, text in lexer.get_tokens(code):
        if not text:
            continue
        look = style.style_for_token(token)
        colour = f"#{look['color']}" if look["color"] else None
        run = (text, colour, bool(look["bold"]), bool(look["italic"]))
        if runs and runs[-1][1:] == run[1:]:
            runs[-1] = (runs[-1][0] + text, *run[1:])
        else:
            runs.append(run)
    return runs
