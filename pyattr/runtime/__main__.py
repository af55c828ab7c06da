"""``python -m pyattr.runtime MODEL.onnx IMAGES... --out DIR``: see :mod:`pyattr.runtime.cli`."""

import sys

from pyattr.runtime.cli import main

sys.exit(main())
