"""DistributedDataParallel with the gloo backend on the CPU, two processes (issue 10, item 5):
a model holding our LSTM (penalties, weight_drop) trains to the same parameters as one
process on the full batch; no find_unused_parameters."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

STEPS, T, B, I, H = 3, 5, 4, 3, 6


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        from rnnreg_kernels import LSTM
        self.rnn = LSTM(I, H, 2, weight_drop=0.3, norm_stabilizer=1.0, tar=0.5, ar=0.5)
        self.head = nn.Linear(H, 1)

    def forward(self, x, y):
        out, _ = self.rnn(x)
        return (self.head(out[-1]).squeeze(-1) - y).pow(2).mean() + self.rnn.penalty


def _data():
    g = torch.Generator().manual_seed(7)
    return (torch.randn(STEPS, T, B, I, generator=g, dtype=torch.float64),
            torch.randn(STEPS, B, generator=g, dtype=torch.float64))


def _train(model, xs, ys, rank=0, world=1):
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    rows = slice(rank * B // world, (rank + 1) * B // world)
    for step in range(STEPS):
        torch.manual_seed(100 + step)  # the same weight_drop masks on every rank
        opt.zero_grad()
        model(xs[step][:, rows], ys[step][rows]).backward()
        opt.step()


def _worker(rank, world, store, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        net = Net().double()
        ddp = nn.parallel.DistributedDataParallel(net)
        xs, ys = _data()
        _train(ddp, xs, ys, rank, world)
        if rank == 0:
            torch.save({k: v.detach() for k, v in net.state_dict().items()}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_ddp_two_gloo_processes_match_one_process(tmp_path):
    out = str(tmp_path / "ddp.pt")
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), out), nprocs=2, join=True)
    torch.manual_seed(0)
    net = Net().double()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    xs, ys = _data()
    _train(net, xs, ys)
    got = torch.load(out)
    moved = False
    for name, value in net.state_dict().items():
        torch.testing.assert_close(got[name], value, rtol=1e-10, atol=1e-12)
        moved |= not torch.equal(value, start[name])
    assert moved
