"""Does FSDP2 (``torch.distributed.fsdp.fully_shard``) run on CPU with gloo here? (issue 21)

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 benchmarks/fsdp2_probe.py

Shards a two-layer MLP per layer and at the root, runs one forward, backward and AdamW step on each
of two processes, and prints the loss (equal on both ranks) and the parameter type (DTensor).
"""
import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

dist.init_process_group("gloo")
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
for layer in m:
    if isinstance(layer, torch.nn.Linear):
        fully_shard(layer)
fully_shard(m)
opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
x = torch.randn(4, 8)
loss = m(x).pow(2).mean()
loss.backward()
opt.step()
print(dist.get_rank(), "ok", loss.item(), [type(p).__name__ for p in m.parameters()][:2])
dist.destroy_process_group()
