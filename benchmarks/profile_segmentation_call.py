"""One Grad-CAM call with a SegmentationTarget on deeplabv3_mobilenet_v3_large (256x256, 1 thread) against the
hand-written bound (forward, the objective, autograd.grad to the layer, the CAM), interleaved medians of 9,
then a cProfile of 5 calls: where an eager call spends its time.

    PYTHONPATH=$PWD python benchmarks/profile_segmentation_call.py
"""
import time

import torch
import torchvision

import pyattr
from pyattr._callview import call_view
from pyattr.targets import SegmentationTarget

torch.set_num_threads(1)
torch.manual_seed(0)
m = torchvision.models.segmentation.deeplabv3_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=21, aux_loss=False).eval()
x = torch.rand(1, 3, 256, 256); region = torch.zeros(1, 256, 256); region[:, 64:192, 64:192] = 1
t = torch.tensor([3])
cam = pyattr.GradCAM(m, "backbone.16")
tg = SegmentationTarget(t, region)
def med(f, n=9):
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); f(); ts.append(time.perf_counter() - t0)
    return sorted(ts)[n // 2] * 1000
def view():
    with call_view(m): pass
layer = m.backbone["16"]
def bound():
    acts = []
    h = layer.register_forward_hook(lambda mod, i, o: acts.append(o))
    out = m(x)["out"]; h.remove()
    s = (out * region[:, None]).sum((2, 3))[:, 3].sum()
    g = torch.autograd.grad(s, acts[0])[0]
    return torch.relu((g.mean((2,3), keepdim=True) * acts[0]).sum(1))
cam(x, tg)
print("eager", med(lambda: cam(x, tg)), "bound", med(bound), "view", med(view))
import cProfile
import pstats

pr = cProfile.Profile(); pr.enable()
for _ in range(5): cam(x, tg)
pr.disable()
pstats.Stats(pr).sort_stats("cumulative").print_stats(25)
