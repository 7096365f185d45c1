#!/usr/bin/env python3
"""Send a safetensors file to receiving ranks in Python: a thin script over the `pgt` package
(`pip install ./python`), the same as `python -m pgt send`. See README.md here."""

import sys

from pgt.cli_send import main

if __name__ == "__main__":
    sys.exit(main())
