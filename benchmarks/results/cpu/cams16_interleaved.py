"""A method eager vs its bound, interleaved, 9 calls each, one thread (see cams16_notes.md).

Run from the repository root: ``PYTHONPATH=. python benchmarks/results/cpu/cams16_interleaved.py METHOD MODEL SIZE``.
"""

import statistics
import sys
import time

import torch

sys.path.insert(0, "benchmarks")
from _bench import cases

torch.set_num_threads(1)
device = torch.device("cpu")
setup = cases.make_setup(sys.argv[2], cases.make_model(sys.argv[2], int(sys.argv[3]), device), 1, int(sys.argv[3]), device)
method = cases.build_pyattr(sys.argv[1], setup)
bound = cases.bound_fn(sys.argv[1], setup)


def eager():
    return method(setup.x, setup.target)


bound(), eager()
times: dict[str, list[float]] = {"bound": [], "eager": []}
for i in range(9):
    for name, fn in ((("bound", bound), ("eager", eager)) if i % 2 == 0 else (("eager", eager), ("bound", bound))):
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
for name, values in times.items():
    print(name, "ms", [round(1000 * v) for v in values])
print("median ratio eager / bound", statistics.median(e / b for e, b in zip(times["eager"], times["bound"])))
