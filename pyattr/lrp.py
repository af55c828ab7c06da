"""Public home of LRP's parts: ``pyattr.lrp.Epsilon()``, ``pyattr.lrp.EpsilonGammaBox(low, high)``, ...

The implementation lives in :mod:`pyattr.methods.lrp`; see ``docs/lrp.md``.
"""

from __future__ import annotations

from .methods.lrp import *
from .methods.lrp import __all__  # noqa: F401
