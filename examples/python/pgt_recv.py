#!/usr/bin/env python3
"""Receive a checkpoint from `pgt send` in Python: a thin script over the `pgt` package
(`pip install ./python`), the same as `python -m pgt recv`. See README.md here."""

import sys

from pgt.recv import main

if __name__ == "__main__":
    sys.exit(main())
