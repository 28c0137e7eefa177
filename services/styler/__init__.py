"""The styler: tokenizer, chat templates, streaming detokenizer, stop strings, tool-call and
reasoning parsers. `Styler` (styler.py) is the in-process API; `rpc.py` serves it over gRPC."""
