"""The torch.distributed rank of tests/test_distributed.rs's
`a_caseopt_rank_meets_a_torch_distributed_rank`: joins the default group the documented way
(`init_process_group("gloo", init_method="env://")`, from MASTER_ADDR, MASTER_PORT, RANK and
WORLD_SIZE), all-reduces and broadcasts what the caseopt rank does, and prints the values."""

from datetime import timedelta

import torch
import torch.distributed as dist

dist.init_process_group("gloo", init_method="env://", timeout=timedelta(seconds=30))
rank = dist.get_rank()
t = torch.tensor([1.0, 2.0, 3.0, 4.0]) * (rank + 1)
dist.all_reduce(t)
b = torch.tensor([0.5, 1.5, 2.5], dtype=torch.float64)
dist.broadcast(b, 0)
print("values=" + str(t.tolist() + b.tolist()), flush=True)
dist.destroy_process_group()
