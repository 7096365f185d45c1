"""``python -m pgt send|recv|inspect …``: the ``pgt`` CLI's subcommands, in Python."""

from __future__ import annotations

import sys

COMMANDS = {
    "send": "send a safetensors file to receiving ranks",
    "recv": "receive a checkpoint and write it as a safetensors (or .npz) file",
    "inspect": "decode and print a metadata blob, a message stream or a safetensors file's header",
}


def usage() -> str:
    lines = ["usage: python -m pgt {send,recv,inspect} [-h] …", ""]
    lines += [f"  {c:<8} {what}" for c, what in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if not argv or argv[0] not in COMMANDS:
        print(usage(), file=sys.stderr)
        return 2
    if argv[0] == "recv":
        from .recv import main as run
    elif argv[0] == "send":
        from .cli_send import main as run
    else:
        from .cli_inspect import main as run
    return run(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
