import statistics, sys, time, torch, torchvision, pyattr
sys.path.insert(0, "benchmarks")
from _bench import cases
torch.set_num_threads(1)
dev = torch.device("cpu")
model = cases.make_model("resnet50", 224, dev)
s = cases.make_setup("resnet50", model, 1, 224, dev)
meth = cases.build_pyattr("eigencam", s)
bound = cases.bound_fn("eigencam", s)
eager = lambda: meth(s.x, s.target)
for f in (bound, eager): f()
tb, te = [], []
for i in range(7):
    for f, acc in ((bound, tb), (eager, te)) if i % 2 == 0 else ((eager, te), (bound, tb)):
        t = time.perf_counter(); f(); acc.append(time.perf_counter() - t)
ratios = [e / b for e, b in zip(te, tb)]
print("bound ms", [round(1000 * v) for v in tb]); print("eager ms", [round(1000 * v) for v in te])
print("median ratio", statistics.median(ratios))
from torch.profiler import profile
with profile() as p:
    eager()
print(p.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))
