"""pgt for Python: move checkpoints between processes with pgt's protocol.

The protocol runs in pgt's wasm core (``pgt.abi``, carried inside this package); Python moves the
bytes. ``pgt.tcp`` is pgt's TCP process group (TCP.md); ``pgt.numpy`` sends and receives checkpoints
of numpy arrays over it (``send_checkpoint``, ``recv_checkpoint``); ``pgt.recv`` is the receive loop
and the receive host every receiver shares, ``pgt.send`` the send loop, ``pgt.metadata`` the
sender's metadata, ``pgt.dtypes`` pgt's dtypes in numpy terms; ``python -m pgt send|recv|inspect``
mirrors the ``pgt`` CLI. ``pgt.torch`` (with the ``torch`` extra) is a drop-in for torch's
``PGTransport``.
"""

from .abi import Pgt, PgtError

__all__ = ["Pgt", "PgtError"]
