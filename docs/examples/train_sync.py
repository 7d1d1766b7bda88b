"""Data-parallel training with SyncBatchNorm.

Run with:  mpiexec -n 4 python -m mpi4py train_sync.py
"""

import numpy as np
from mpi4py import MPI

import cnorm.nn as nn

comm = MPI.COMM_WORLD
model = nn.convert_sync_batchnorm([nn.BatchNorm2d(64), nn.GroupNorm(8, 64)])  # or nn.SyncBatchNorm(64)
params = [p for layer in model for p in (layer.weight, layer.bias) if p is not None]
for p in params:                       # start identical everywhere
    comm.Bcast(p, root=0)

rng = np.random.default_rng(comm.rank)
for step in range(20):
    x = rng.standard_normal((8, 64, 16, 16)).astype(np.float32)   # this rank's shard (any size, even 0)
    y = x
    for layer in model:
        y = layer(y)
    dy = 2 * y / y.size                # gradient of this rank's loss (the mean of y²)
    for layer in reversed(model):
        dy = layer.backward(dy)
    for layer in model:                # the usual gradient all-reduce, SyncBatchNorm included
        for p, g in ((layer.weight, layer.weight_grad), (layer.bias, layer.bias_grad)):
            if g is not None:
                comm.Allreduce(MPI.IN_PLACE, g)
                p -= 0.01 * g / comm.size

# The running statistics are bit-identical on every rank.
bn = model[0]
everyone = comm.allgather(bn.running_mean.tobytes() + bn.running_var.tobytes())
assert all(s == everyone[0] for s in everyone)
if comm.rank == 0:
    print(f"{comm.size} ranks, {int(bn.num_batches_tracked)} steps: running statistics identical on every rank")
