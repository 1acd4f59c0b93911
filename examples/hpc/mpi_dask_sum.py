"""Run with an MPI launcher: `mpirun -n 4 python mpi_dask_sum.py` (or
`srun -n 4 ...`). Rank 0 runs the scheduler, ranks 2 and up the workers,
rank 1 this program's client code; every rank exits when it ends."""

import shoal.mpi

shoal.mpi.initialize(dashboard=False)

import dask.array as da  # noqa: E402

import shoal  # noqa: E402

with shoal.Client() as client:  # joins the cluster initialize() started
    client.wait_for_workers(2, timeout=120)
    x = da.ones((4000, 4000), chunks=(1000, 1000))
    print("sum:", int((x * 2).sum().compute()))
