"""How guided decoding spells added tokens: a text no request writes, so only their id reaches them.

The worker's llguidance tokenizer (services/worker/grammar_check.py) replaces each added token's
text with `unreachable_text(id)`: a constraint's literal `<think>` is then written with ordinary
tokens, never as the added token llguidance's own parser would refuse. A grammar that names an
added token by id (`<[151657]>`) and must keep it out of its free text (the strict tool-call
grammars, services/styler/parsers/tool_grammar.py) excludes this text.
"""

from __future__ import annotations


def unreachable_text(token_id: int) -> str:
    """The text the worker's llguidance tokenizer gives the added token `token_id`."""
    return f"\ufffe<tandem-unreachable-{token_id}>\ufffe"
