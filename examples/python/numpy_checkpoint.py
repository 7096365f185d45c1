#!/usr/bin/env python3
"""A checkpoint of numpy arrays from rank 0 to every other rank, with `pgt.numpy` (no torch): run one
process per rank with the torch-style environment (see README.md here).

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=2 PGT_TOKEN=secret RANK=0 python numpy_checkpoint.py
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=2 PGT_TOKEN=secret RANK=1 python numpy_checkpoint.py

The receivers may as well be `pgt recv --out x.safetensors` (Rust) or `python -m pgt recv`.
"""

import numpy as np

from pgt.numpy import recv_checkpoint, send_checkpoint
from pgt.tcp import TcpGroup, TcpOptions


def main():
    with TcpGroup.join(TcpOptions.from_env()) as pg:
        if pg.rank == 0:
            w = np.arange(12, dtype=np.float32).reshape(3, 4)
            state = {"model": {"w": w, "w_t": w.T, "b": np.zeros(4)}, "epoch": 3}
            send_checkpoint(pg, [r for r in range(1, pg.size)], state, step=100)
            print(f"rank 0 sent step 100 to ranks 1..{pg.size - 1}")
        else:
            state, step = recv_checkpoint(pg, 0, return_step=True)
            print(f"rank {pg.rank} received step {step}: w_t =\n{state['model']['w_t']}")


if __name__ == "__main__":
    main()
