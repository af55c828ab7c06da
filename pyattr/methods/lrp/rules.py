"""LRP rules, composed from small parts: input modifiers, parameter modifiers, a stabilizer.

Conventions (those of zennit, Anders et al. 2021, arXiv:2106.13200): the gradient that flows between
layers *is* the relevance. For a layer ``z = f(x; w, b)`` that is linear in ``x`` (convolution,
linear, average pooling), a rule is a list of :class:`Term`, each a modified copy of the layer
``z_i = f(in_i(x); W_i(w), B_i(b))``. Terms are grouped; each group ``g`` has the denominator
``D_g = sum_{i in g} sign_i z_i`` and the relevance that reaches the layer's input is

    R_in = sum_i coef_i * sign_i * in_i(x) * J_i^T (gate_g * R_out / stabilize(D_g))

where ``J_i^T`` is the transposed Jacobian of ``z_i`` with respect to its input (a transposed
convolution, a matrix product; computed with ``torch.autograd.grad``) and ``gate_g`` an optional
mask on the sign of the unmodified output. Every rule below is one choice of terms:

==============  =================================================================================
rule            terms (input, weight, bias) [sign, coef, group]
==============  =================================================================================
Epsilon(eps)    (x, w, b); LRP-0 is ``Epsilon(0)`` (Bach et al. 2015)
Gamma(gamma)    generalized gamma (Montavon et al. 2019; Andeol et al. 2021): positive group
                (x+, w + g w+, b + g b+), (x-, w + g w-, 0) gated by z > 0; negative group
                (x+, w + g w-, b + g b-), (x-, w + g w+, 0) gated by z < 0
ZPlus           (x+, w+, b+), (x-, w-, 0): alpha=1, beta=0 with negative inputs allowed
AlphaBeta(a,b)  (x+, w+, b+), (x-, w-, 0) [coef a, group 0]; (x+, w-, b-), (x-, w+, 0) [coef -b, group 1]
ZBox(lo, hi)    z^B (Montavon et al. 2017): (x, w, b), (lo, w+, b+) [sign -1], (hi, w-, b-) [sign -1]
Flat            (1, 1, 0) (Lapuschkin et al. 2019)
WSquare         (1, w^2, 0) (Montavon et al. 2017)
Norm            (x) for parameter-free linear layers (average pooling); = Epsilon without params
==============  =================================================================================

``Pass`` passes the relevance through unchanged (element-wise activations, an unmerged BatchNorm);
``Gradient`` keeps the layer's own gradient (e.g. max-pooling: winner takes all).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Modifier = Callable[[torch.Tensor], torch.Tensor]
LayerFunction = Callable[[torch.Tensor, "torch.Tensor | None", "torch.Tensor | None"], torch.Tensor]
InputGradient = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor], torch.Tensor]
TermParams = Callable[[int], "tuple[torch.Tensor | None, torch.Tensor | None]"]


# -- parts ---------------------------------------------------------------------------------------
def identity(t: torch.Tensor) -> torch.Tensor:
    return t


def positive(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(min=0)


def negative(t: torch.Tensor) -> torch.Tensor:
    return t.clamp(max=0)


def ones(t: torch.Tensor) -> torch.Tensor:
    return torch.ones_like(t)


def square(t: torch.Tensor) -> torch.Tensor:
    return t * t


def gamma_mod(gamma: float, sign: str) -> Modifier:
    """``p + gamma * p+`` (``sign="+"``) or ``p + gamma * p-`` (``sign="-"``)."""
    part = positive if sign == "+" else negative

    def modifier(p: torch.Tensor) -> torch.Tensor:
        return p + gamma * part(p)

    return modifier


def constant(value: float | torch.Tensor) -> Modifier:
    """An input modifier that replaces the input by ``value`` (broadcast to its shape)."""
    value = torch.as_tensor(value)
    if not value.is_floating_point():
        value = value.float()

    def modifier(x: torch.Tensor) -> torch.Tensor:
        v = value.to(device=x.device, dtype=x.dtype)
        if v.dim() > 0 and v.dim() < x.dim():
            v = v.reshape(1, *v.shape, *[1] * (x.dim() - 1 - v.dim()))
        return v.expand_as(x)

    return modifier


@dataclass(frozen=True)
class Stabilizer:
    """``z + epsilon * sign(z)`` with sign(0) = +1 (zennit's convention). ``epsilon=0`` gives the
    unstabilized LRP-0, where exact zeros are divided by 1 instead (their relevance is 0 anyway)."""

    epsilon: float = 1e-6

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.epsilon == 0:
            return torch.where(z == 0, torch.ones_like(z), z)
        return z + self.signed_epsilon(z)

    def signed_epsilon(self, z: torch.Tensor) -> torch.Tensor:
        """``epsilon * sign(z)`` with sign(0) = +1, in one pass (a NaN ``z`` stays NaN in ``z + this``)."""
        epsilon = z.new_full((), self.epsilon)
        return torch.where(z < 0, -epsilon, epsilon)

    def divide(self, relevance: torch.Tensor, z: torch.Tensor, owned: bool = False, nonnegative: bool = False
               ) -> torch.Tensor:
        """``relevance / self(z)``, the same numbers with fewer full-size temporaries; ``owned``: ``z`` is a
        temporary of the caller's that may be overwritten (then it holds the result); ``nonnegative``: every
        element of ``z`` is >= 0, -0.0 or NaN by construction (a sum of products of factors of one sign), so
        ``self(z)`` is ``z + epsilon``."""
        if self.epsilon == 0:
            return relevance / self(z)
        shift = self.epsilon if nonnegative else self.signed_epsilon(z)
        z = z.add_(shift) if owned else z + shift
        return torch.div(relevance, z, out=z)


@dataclass(frozen=True)
class Term:
    """One modified copy of the layer. ``bias=None`` drops the bias."""

    input: Modifier = identity
    weight: Modifier = identity
    bias: Modifier | None = identity
    sign: float = 1.0
    coef: float = 1.0
    group: int = 0


def term_parameters(
    term: Term, weight: torch.Tensor | None, bias: torch.Tensor | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(W_i(w), B_i(b))`` of one term (None where the layer has no such parameter or the term drops it)."""
    wi = None if weight is None else term.weight(weight)
    bi = None if (bias is None or term.bias is None) else term.bias(bias)
    return wi, bi


# -- rules ---------------------------------------------------------------------------------------
class Rule:
    """Base of all rules. ``Rule.kind`` says how the layer's backward changes:
    ``"linear"`` (terms below), ``"pass"`` (identity) or ``"gradient"`` (unchanged)."""

    kind = "linear"

    def describe(self) -> str:
        return type(self).__name__


@dataclass(frozen=True, repr=False)
class LinearRule(Rule):
    """A rule made of :class:`Term` s, a stabilizer and optional per-group gates
    (``gates[g]`` = ``"positive"`` / ``"negative"``: keep the relevance of outputs whose
    unmodified value has that sign)."""

    terms: Sequence[Term] = (Term(),)
    stabilizer: Stabilizer = field(default_factory=Stabilizer)
    gates: dict[int, str] | None = None
    label: str = "LinearRule"

    def __repr__(self) -> str:
        return self.label

    def describe(self) -> str:
        return self.label

    def relevance(
        self,
        layer: LayerFunction,
        x: torch.Tensor,
        weight: torch.Tensor | None,
        bias: torch.Tensor | None,
        relevance_out: torch.Tensor,
        *,
        output: torch.Tensor | None = None,
        nonnegative: bool = False,
        input_gradient: InputGradient | None = None,
        term_params: TermParams | None = None,
    ) -> torch.Tensor:
        """The relevance at the layer's input, for ``relevance_out`` at its output.

        What the caller knows saves work, never changes the result:

        - ``output``: the layer's own output ``f(x; w, b)``, reused for an unmodified term's ``z``
          and for the gates instead of running the layer again;
        - ``nonnegative``: ``x >= 0`` holds by construction (it is a ReLU's output, or max-pooled
          from one), so terms on ``x-`` are exactly zero and are skipped, and ``x+`` is ``x``;
        - ``input_gradient(x, w_i, s)``: ``J_i^T s`` computed directly (a transposed convolution, a
          matrix product), so that a term whose ``z`` is known needs no forward pass of its own;
        - ``term_params(i)``: term ``i``'s ``(W_i(w), B_i(b))`` made before (kept between calls by
          :class:`~pyattr.methods.lrp.LRP`), instead of applying its modifiers to ``weight`` and ``bias``.
        """
        x = x.detach()
        relevance_out = relevance_out.detach()
        reference = None if output is None else output.detach()
        kept = [i for i, t in enumerate(self.terms) if not (nonnegative and t.input is negative)]
        terms = [self.terms[i] for i in kept]
        zs, inputs, weights = [], [], []
        owned = []  # zs[i] is a temporary of this call's (no graph, no one else's): may be overwritten
        for index, term in zip(kept, terms):
            unmodified_input = term.input is identity or (nonnegative and term.input is positive)
            xi = x if unmodified_input else term.input(x).detach()
            if term_params is not None:
                wi, bi = term_params(index)
            else:
                wi, bi = term_parameters(term, weight, bias)
            if (unmodified_input and term.weight is identity and term.bias is identity and reference is not None
                    and input_gradient is not None):
                zs.append(reference)
                owned.append(False)
            elif input_gradient is not None:
                with torch.no_grad():
                    zs.append(layer(xi, wi, bi))
                owned.append(True)
            else:
                with torch.enable_grad():
                    xi = xi.detach().requires_grad_(True)
                    zs.append(layer(xi, wi, bi))
                owned.append(False)
            inputs.append(xi)
            weights.append(wi)
        # the same operations as ``relevance_out / stabilizer(sum of sign_i z_i)`` and ``sum coef_i sign_i x_i g_i``,
        # computed in place in the temporaries of this call where there are some (full-size temporaries cost
        # memory traffic and page faults at every layer)
        exact_stabilizer = type(self.stabilizer) is Stabilizer
        scaled = {}
        for g in sorted({t.group for t in terms}):
            denominator, fresh = None, False
            for t, z, own in zip(terms, zs, owned):
                if t.group == g:
                    part = z.detach() if t.sign == 1.0 else t.sign * z.detach()
                    if denominator is None:
                        denominator, fresh = part, own or t.sign != 1.0
                    elif fresh:
                        denominator = denominator.add_(part)
                    else:
                        denominator, fresh = denominator + part, True
            if exact_stabilizer:
                s = self.stabilizer.divide(relevance_out, denominator, owned=fresh, nonnegative=all(
                    _nonnegative_term(t, nonnegative) for t in terms if t.group == g))
            else:
                s = relevance_out / self.stabilizer(denominator)
            gate = (self.gates or {}).get(g)
            if gate is not None:
                if reference is None:
                    with torch.no_grad():
                        reference = layer(x, weight, bias)
                mask = reference > 0 if gate == "positive" else reference < 0
                s = s.mul_(mask.to(s))
            scaled[g] = s
        if input_gradient is not None:
            # fresh results of a transposed convolution / matrix product each: multiplied in place below
            grads = [input_gradient(xi, wi, scaled[t.group]) for t, xi, wi in zip(terms, inputs, weights)]
        else:
            grads = torch.autograd.grad(zs, inputs, grad_outputs=[scaled[t.group] for t in terms])
        result = None
        for term, xi, gi in zip(terms, inputs, grads):
            factor = term.coef * term.sign
            if input_gradient is not None:
                part = gi.mul_(xi.detach()) if factor == 1.0 else gi.mul_(xi.detach()).mul_(factor)
            else:
                part = xi.detach() * gi if factor == 1.0 else factor * (xi.detach() * gi)
            if result is None:
                result = part
            elif input_gradient is not None:  # result is grads[0], this call's own temporary
                result = result.add_(part)
            else:
                result = result + part
        return result


def _nonnegative_term(term: Term, nonnegative_input: bool) -> bool:
    """Whether the term's ``sign * z_i`` is >= 0 (or -0.0, or NaN) whatever the input: its input and weight are
    the same sign's part (``x+ w+``, ``x- w-``; ``x`` itself when it is >= 0 by construction) and its bias is
    ``b+`` or none (a sum of products >= 0 rounds to >= 0 or -0.0)."""
    x_positive = term.input is positive or (nonnegative_input and term.input is identity)
    same_sign = (x_positive and term.weight is positive) or (term.input is negative and term.weight is negative)
    return same_sign and term.bias in (positive, None) and term.sign == 1.0


def Epsilon(epsilon: float = 1e-6) -> LinearRule:
    """LRP-epsilon: ``R_i = sum_j x_i w_ij / (z_j + eps sign(z_j)) R_j``; ``epsilon=0`` is LRP-0."""
    return LinearRule((Term(),), Stabilizer(epsilon), label=f"Epsilon(epsilon={epsilon})")


def LRP0() -> LinearRule:
    """LRP-0 (Bach et al. 2015): ``R_i = sum_j x_i w_ij / z_j R_j``."""
    return LinearRule((Term(),), Stabilizer(0.0), label="LRP0()")


def Gamma(gamma: float = 0.25, stabilizer: float = 1e-6) -> LinearRule:
    """Generalized LRP-gamma (zennit's form; equal to Montavon et al. 2019 for positive inputs)."""
    terms = (
        Term(positive, gamma_mod(gamma, "+"), gamma_mod(gamma, "+"), group=0),
        Term(negative, gamma_mod(gamma, "-"), None, group=0),
        Term(positive, gamma_mod(gamma, "-"), gamma_mod(gamma, "-"), group=1),
        Term(negative, gamma_mod(gamma, "+"), None, group=1),
    )
    return LinearRule(
        terms, Stabilizer(stabilizer), {0: "positive", 1: "negative"}, label=f"Gamma(gamma={gamma})"
    )


def AlphaBeta(alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> LinearRule:
    """LRP-alpha-beta (Bach et al. 2015): ``alpha * R+ - beta * R-``, ``alpha - beta = 1``."""
    if alpha < 0 or beta < 0 or abs(alpha - beta - 1) > 1e-12:
        raise ValueError(
            f"AlphaBeta needs alpha, beta >= 0 and alpha - beta = 1, got alpha={alpha}, beta={beta}"
        )
    terms = (
        Term(positive, positive, positive, coef=alpha, group=0),
        Term(negative, negative, None, coef=alpha, group=0),
        Term(positive, negative, negative, coef=-beta, group=1),
        Term(negative, positive, None, coef=-beta, group=1),
    )
    return LinearRule(terms, Stabilizer(stabilizer), label=f"AlphaBeta(alpha={alpha}, beta={beta})")


def Alpha1Beta0(stabilizer: float = 1e-6) -> LinearRule:
    """alpha=1, beta=0 (its positive group only)."""
    return AlphaBeta(1.0, 0.0, stabilizer)


def Alpha2Beta1(stabilizer: float = 1e-6) -> LinearRule:
    return AlphaBeta(2.0, 1.0, stabilizer)


def ZPlus(stabilizer: float = 1e-6) -> LinearRule:
    """LRP-z+: positive contributions only (x+ w+ and x- w-), the bias's positive part."""
    terms = (Term(positive, positive, positive), Term(negative, negative, None))
    return LinearRule(terms, Stabilizer(stabilizer), label="ZPlus()")


def ZBox(low: float | torch.Tensor, high: float | torch.Tensor, stabilizer: float = 1e-6) -> LinearRule:
    """z^B for inputs bounded in [low, high] (the first layer; bounds in the layer's input space,
    e.g. ``(0 - mean) / std`` and ``(1 - mean) / std`` per channel for normalized images)."""
    terms = (
        Term(identity, identity, identity),
        Term(constant(low), positive, positive, sign=-1.0),
        Term(constant(high), negative, negative, sign=-1.0),
    )
    return LinearRule(terms, Stabilizer(stabilizer), label="ZBox()")


def Flat(stabilizer: float = 1e-6) -> LinearRule:
    """Flat: relevance spread uniformly over each output's receptive field."""
    return LinearRule((Term(ones, ones, None),), Stabilizer(stabilizer), label="Flat()")


def WSquare(stabilizer: float = 1e-6) -> LinearRule:
    """w^2: relevance spread in proportion to the squared weights (no bias)."""
    return LinearRule((Term(ones, square, None),), Stabilizer(stabilizer), label="WSquare()")


def Norm(stabilizer: float = 1e-6) -> LinearRule:
    """Epsilon for a parameter-free linear layer (average pooling)."""
    return LinearRule((Term(),), Stabilizer(stabilizer), label="Norm()")


class Pass(Rule):
    """The relevance passes through unchanged (element-wise layers: activations, BatchNorm)."""

    kind = "pass"

    def __repr__(self) -> str:
        return "Pass()"


class Gradient(Rule):
    """The layer keeps its own gradient (max-pooling: winner takes all; dropout, flatten)."""

    kind = "gradient"

    def __repr__(self) -> str:
        return "Gradient()"
