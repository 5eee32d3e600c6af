"""Run under torchrun by test_models: trains with the given CLI flags, then checks that the
model's and the discriminator's weights are identical on every rank (DDP kept them in sync)."""
import gc
import sys

import torch
import torch.distributed as dist

from pvkernels_models.train import Trainer, build_parser


def check(argv) -> None:
    trainer = Trainer(build_parser().parse_args(argv))
    trainer.train()
    for name, module in (("model", trainer.model), ("disc", trainer.disc)):
        mine = torch.cat([p.detach().flatten() for p in module.parameters()])
        theirs = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(theirs, mine)
        assert all(torch.equal(mine, t) for t in theirs), f"{name} weights differ between ranks"


check(sys.argv[1:])
gc.collect()  # as train.main: the DDP modules (which hold the process group) gone before it is destroyed
dist.barrier()  # no rank tears its gloo pairs down while another still uses them
dist.destroy_process_group()
