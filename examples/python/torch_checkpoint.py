#!/usr/bin/env python3
"""A PyTorch checkpoint from rank 0 to every other rank with `pgt.torch.PGTransport` over pgt's TCP
process group (`pgt.tcp.TcpGroup`): run one process per rank with the torch-style environment.

    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=3 PGT_TOKEN=secret RANK=0 python torch_checkpoint.py
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=3 PGT_TOKEN=secret RANK=1 pgt recv --out r1.safetensors
    MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 WORLD_SIZE=3 PGT_TOKEN=secret RANK=2 python torch_checkpoint.py

Any rank may be Rust: above, the Rust `pgt recv` (rank 1) receives and relays to rank 2 (chain
fan-out). Rank 0 may as well be `pgt send model.safetensors`: the receivers get torch tensors.
"""

from datetime import timedelta

import torch

from pgt.tcp import TcpGroup, TcpOptions
from pgt.torch import PGTransport


def tensors(tree, prefix=""):
    for k, v in tree.items():
        if isinstance(v, dict):
            yield from tensors(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield f"{prefix}{k}", v


def main():
    with TcpGroup.join(TcpOptions.from_env()) as pg:
        transport = PGTransport(pg, timedelta(seconds=60), torch.device("cpu"))
        if pg.rank == 0:
            torch.manual_seed(0)
            model = torch.nn.Sequential(
                torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)
            )
            state = {"model": model.state_dict(), "epoch": 3}
            transport.send_checkpoint(list(range(1, pg.size)), state, step=100)
            print(f"rank 0 sent step 100 to ranks 1..{pg.size - 1}")
        else:
            state = transport.recv_checkpoint(0)
            for name, t in tensors(state):
                print(
                    f"rank {pg.rank}: {name} {t.dtype} {tuple(t.shape)} sum={t.double().sum():.6f}"
                )


if __name__ == "__main__":
    main()
