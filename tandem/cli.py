"""The `tandem` command: `tandem up`, `tandem gateway`, `tandem styler`, `tandem worker`, `tandem epp`.

Each subcommand's module is imported only when it runs, so `tandem gateway` never imports torch
and `tandem --help` is instant.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence

from tandem import __version__

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "up": ("tandem.up", "start styler, worker(s) and gateway on this machine"),
    "gateway": ("gateway.main", "the OpenAI-compatible HTTP gateway (and public gRPC API)"),
    "styler": ("services.styler.main", "the tokenizer / chat-template service"),
    "worker": ("services.worker.main", "a model worker (GPU or CPU)"),
    "epp": ("gateway.epp_main", "Endpoint Picker (Envoy ext-proc) for a Kubernetes InferencePool"),
}

USAGE = "usage: tandem [--version] [--help] {" + ",".join(SUBCOMMANDS) + "} ..."


def help_text() -> str:
    lines = [USAGE, "", "tandem: LLM serving as small services over streaming gRPC.", "", "commands:"]
    lines += [f"  {name:<9} {desc}" for name, (_, desc) in SUBCOMMANDS.items()]
    lines += ["", "Run `tandem COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(help_text())
        return 0 if args else 2
    if args[0] in ("-V", "--version"):
        print(f"tandem {__version__}")
        return 0
    name, rest = args[0], args[1:]
    if name not in SUBCOMMANDS:
        print(f"tandem: error: unknown command {name!r}\n{USAGE}", file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return int(module.main(rest, prog=f"tandem {name}") or 0)


if __name__ == "__main__":
    sys.exit(main())
