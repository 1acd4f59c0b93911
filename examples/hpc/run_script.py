"""Run as one job step: `srun -n 4 shoal run -- python run_script.py`
(or `mpirun -n 4 shoal run -- ...`). Rank 0 runs the scheduler and this
script; the other ranks are its workers; all stop when it ends."""

import shoal

with shoal.Client() as client:
    client.wait_for_workers(1, timeout=120)
    squares = client.gather(client.map(lambda i: i * i, range(1000)))
    print("sum of squares:", sum(squares))
