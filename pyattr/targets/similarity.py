"""Embeddings: explain why an image is similar to a reference (retrieval, re-identification, CLIP)."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import InputError
from .base import Target, per_sample

MEASURES = ("cosine", "dot")


def embedding_of(output: Any) -> Any:
    """An embedding model's output as (N, D): (N, D, 1, 1) pooled maps are flattened."""
    if isinstance(output, torch.Tensor) and output.dim() == 4 and output.shape[2] == output.shape[3] == 1:
        return output.flatten(1)
    return output


class SimilarityTarget(Target):
    """The similarity of the image's embedding ``e`` (the model's (N, D) output) to a reference ``r``:
    ``cosine``: ``e . r / (max(|e|, eps) * max(|r|, eps))`` (eps 1e-8), or ``dot``: ``e . r``.

    The reference is an embedding given at run time, one per sample (N, D) or one for all (D,) or (1, D):
    another image's embedding from the same model, or for an image-text model (CLIP-style) a text
    embedding computed elsewhere, so that the explained (and exported) model is only the image tower. The
    target's scores are (N, 1) (the similarity) and the class id is 0 (``classes`` must be None or 0).
    pytorch-grad-cam's ``SimilarityToConceptTarget(features)`` is the cosine case.

    Exported graphs take ``reference`` (N, D) float32 after ``target`` and return ``embedding`` (N, D) after
    ``maps``: run the graph on a reference image to get its embedding.

    Args:
        reference: (N, D), (1, D) or (D,) embedding(s); required for eager calls, optional for export (the
            graph takes it as an input).
        measure: ``"cosine"`` (default) or ``"dot"``.

    Example:
        >>> embed = pyattr.zoo.load_builtin_embedding()                      # doctest: +SKIP
        >>> ref = embed(reference_image)                                     # doctest: +SKIP
        >>> pyattr.GradCAM(embed, "layer3")(query, pyattr.targets.SimilarityTarget(ref))  # doctest: +SKIP
    """

    kind = "similarity"
    inputs = ("reference",)
    outputs = ("embedding",)
    convention = ("target is an int64 (N,) tensor of zeros (-1 works too); reference is a float32 (N, D) "
                  "embedding per sample; the graph returns each image's embedding (N, D) as 'embedding'")

    def __init__(self, reference: Any = None, measure: str = "cosine", classes: Any = None):
        if measure not in MEASURES:
            raise InputError(f"measure must be one of {', '.join(MEASURES)}, got {measure!r}")
        if not isinstance(classes, torch.Tensor) and classes not in (None, 0, -1):
            raise InputError(f"a similarity target has one score (class id 0); got classes={classes!r}")
        super().__init__(classes)
        self.reference = reference
        self.measure = measure

    def scores(self, output: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        e = embedding_of(output)
        r = inputs["reference"]
        dot = (e * r).sum(1, keepdim=True)
        if self.measure == "dot":
            return dot
        eps = 1e-8
        norms = e.norm(dim=1, keepdim=True).clamp_min(eps) * r.norm(dim=1, keepdim=True).clamp_min(eps)
        return dot / norms

    def check_output(self, output: Any, x: torch.Tensor, inputs: dict[str, torch.Tensor]) -> None:
        e = embedding_of(output)
        if not isinstance(e, torch.Tensor) or e.dim() != 2 or e.shape[0] != x.shape[0]:
            shape = tuple(e.shape) if isinstance(e, torch.Tensor) else type(e).__name__
            raise InputError(f"a similarity target needs an embedding (N, D) with N = {x.shape[0]} from the model; "
                             f"it returned {shape} (pick the embedding with output=...)")
        d = inputs["reference"].shape[1]
        if e.shape[1] != d:
            raise InputError(f"the reference embedding has dimension {d} but the model's embedding has "
                             f"{e.shape[1]}: compute the reference with the same model (or tower)")

    def run_time_inputs(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.reference is None:
            raise InputError("a similarity target needs reference=...: the embedding (N, D) or (D,) to compare "
                             "with, e.g. the model's output for a reference image")
        ref = torch.as_tensor(self.reference, device=x.device)
        if ref.dim() not in (1, 2):
            raise InputError(f"reference must be an embedding (N, D), (1, D) or (D,), got shape {tuple(ref.shape)}")
        d = int(ref.shape[-1])
        ref = per_sample(ref, "reference", x, (d,), "an embedding per sample or one for all")
        if bool((ref.norm(dim=1) == 0).any()) and self.measure == "cosine":
            raise InputError("reference holds an all-zero embedding: its cosine similarity has no direction")
        return {"reference": ref}

    def example_inputs(self, x: torch.Tensor, output: Any) -> dict[str, torch.Tensor]:
        if self.reference is not None:
            return self.run_time_inputs(x)
        e = embedding_of(output)
        if not isinstance(e, torch.Tensor) or e.dim() != 2:
            self.check_output(output, x, {"reference": torch.zeros(1, 1)})
        return {"reference": e.detach().flip(0).contiguous() + 1.0}

    def extra_outputs(self, output: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"embedding": embedding_of(output).detach()}

    def metadata(self) -> dict[str, Any]:
        return {"kind": self.kind, "measure": self.measure}

    def __repr__(self) -> str:
        ref = None if self.reference is None else tuple(torch.as_tensor(self.reference).shape)
        return f"SimilarityTarget(reference={ref}, measure={self.measure!r})"
