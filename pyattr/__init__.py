"""pyattr: attribution maps for PyTorch vision models, exported as single graphs."""

__version__ = "0.1.0"

from . import zoo  # noqa: E402
from .errors import ExportError, InputError, LayerNotFoundError, PyattrError  # noqa: E402
from .exporting import export, read_metadata  # noqa: E402
from .methods import METHODS, Attribution, AttributionMethod, GradCAM, Saliency  # noqa: E402

__all__ = [
    "METHODS", "Attribution", "AttributionMethod", "ExportError", "GradCAM", "InputError",
    "LayerNotFoundError", "PyattrError", "Saliency", "__version__", "export", "read_metadata", "zoo",
]
