"""The tests run against the installed `pgt` package (scripts/test.sh: `pip install ./python` after
scripts/build-wasm.sh), the way a user has it."""

import pgt

assert pgt.__file__ is not None
