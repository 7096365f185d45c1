"""pgt for Python: move checkpoints between processes with pgt's protocol.

The protocol runs in pgt's wasm core (``pgt.abi``, carried inside this package); Python moves the
bytes. ``pgt.tcp`` is pgt's TCP process group (TCP.md), ``pgt.recv`` receives a checkpoint over it,
``pgt.torch`` (with the ``torch`` extra) is a drop-in for torch's ``PGTransport``.
"""

from .abi import Pgt, PgtError

__all__ = ["Pgt", "PgtError"]
