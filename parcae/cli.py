"""The ``parcae`` command.

    parcae model parcae-140m gpt-140m --meta   # parameters by part and FLOPs/token of presets
"""

from __future__ import annotations

import sys

USAGE = """usage: parcae <command> [options]

commands:
  model    inspect model presets: parameters by part, FLOPs per token, a test forward
           (parcae model parcae-debug | parcae model parcae-140m gpt-140m --meta)
"""


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE, end="")
        return
    command, rest = argv[0], argv[1:]
    if command == "model":
        from parcae.model.__main__ import main as model_main

        sys.argv = ["parcae model", *rest]
        model_main()
        return
    sys.exit(f"parcae: unknown command {command!r}\n{USAGE}")
