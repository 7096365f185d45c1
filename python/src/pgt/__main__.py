"""``python -m pgt recv …``: the ``pgt`` CLI's subcommands, in Python."""

from __future__ import annotations

import sys

COMMANDS = ("recv",)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m pgt {{{','.join(COMMANDS)}}} [-h] …", file=sys.stderr)
        return 2
    if argv[0] == "recv":
        from .recv import main as recv

        return recv(argv[1:])
    raise AssertionError(argv[0])


if __name__ == "__main__":
    sys.exit(main())
