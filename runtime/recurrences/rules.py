"""Recurrence rules behind one interface: each rule's implementation (``RecurrenceRule``) lives in its own
folder beside the others (``decay/``, ``delta/``), in a ``rule.py`` that builds it and registers it here under
the word the language gives it (``core.recurrence_rules``). The runner, ``Attention.step`` and context
parallelism call a rule through this table only; adding a rule is writing its folder and naming it in
``RULE_MODULES`` (CONTRIBUTING.md)."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ...core import ir
from ...core.recurrence_rules import RULES, RuleFacts
from ..numerics import compute_dtype, expand_kv

#: The folders whose ``rule.py`` registers a rule (imported at the first lookup).
RULE_MODULES = ("decay", "delta", "titans")


@dataclass(frozen=True)
class RecurrenceRule:
    """One rule's implementation. Tensors are ``[B, H, T, D]``; ``rec`` the pattern, ``bound`` / ``tensors`` the
    call's bound sizes and inputs (``common.bind``), ``scale`` a float, ``s0`` an initial state or None.

    - ``prepare(rec, q, k, v) -> (q, k)``: q and k as the rule reads them (its options on them; GVA's repeat),
      before every backend and the decoding step (``unchanged_qk``: as given).
    - ``reference(rec, bound, q, k, v, tensors, scale, s0) -> (out, state)``: token by token, the source of truth
      (plain torch autograd); ``k``, ``v`` with their own heads, out in q's dtype (``loop_reference`` makes one
      from a loop over q's heads in the compute dtype).
    - ``run(backend, rec, bound, q, k, v, tensors, scale, s0, chunk, hardware, native) -> (out, state, chunk)``:
      the chunked forms ('cpu': torch; 'triton'; 'auto'), ``k``, ``v`` with their own heads (GQA).
    - ``step(rec, tensors, q, k, v, g, state, scale) -> (out, state)``: one token, ``[B, H, Dk]`` / ``[B, H, Dv]``
      with q's heads and its log gates ``g`` ``[B, H, 1 | Dk]``, in the compute dtype; the state
      ``[B, H, state_rows * Dk, Dv]``.
    - ``describe(rec, backend, chunk) -> str``: ``Attention.source``: the update and the code that runs.
    - ``entering_map(run, bind, rec, q, k, v, dtype) -> (kind, A)``: how a part's final state depends on the state
      it starts from, ``S_out = A(S_in) + S_out(0)`` (context parallelism chains the parts): ``("scale", A)``
      multiplies, ``("matrix", A)`` multiplies on the left; ``run(k, v, s0)`` runs the part, ``bind()`` gives
      its ``(bound, tensors)`` (called only by a map that reads them).
    - ``check_rates(rec, tensors)``: refuse rate inputs the rule's forms are not exact for (None: any), naming
      the input; run by ``common.bind``, on every path.
    - ``has_triton``: whether ``run`` has Triton kernels ('triton' is refused at compile time where not; 'auto'
      then runs the torch form).
    """

    facts: RuleFacts
    prepare: Callable
    reference: Callable
    run: Callable
    step: Callable
    describe: Callable
    entering_map: Callable
    check_rates: Callable | None = None
    has_triton: bool = True

    @property
    def name(self) -> str:
        return self.facts.name


_REGISTERED: dict[str, RecurrenceRule] = {}
_loaded = False  # RULE_MODULES imported


def register(rule: RecurrenceRule) -> RecurrenceRule:
    """Add a rule (its ``rule.py`` calls this); the language must know its word (``core.recurrence_rules``)."""
    if rule.name not in RULES:
        raise ValueError(f"recurrence rule '{rule.name}' is not in core.recurrence_rules.RULES")
    _REGISTERED[rule.name] = rule
    return rule


def rule_of(rec: ir.RecurrenceIR) -> RecurrenceRule:
    """The implementation of ``rec``'s rule (the folders of ``RULE_MODULES`` imported at the first lookup, whatever
    was registered before it)."""
    global _loaded
    if not _loaded:
        for folder in RULE_MODULES:
            importlib.import_module(f"{__package__}.{folder}.rule")
        _loaded = True
    return _REGISTERED[rec.rule]


def unchanged_qk(rec, q, k, v):
    """``prepare`` of a rule that reads q and k as given."""
    return q, k


def loop_reference(loop: Callable) -> Callable:
    """A rule's ``reference`` from its token loop ``loop(rec, bound, q, k, v, tensors, scale, s0)``, which takes
    every tensor in the compute dtype with q's heads: k and v are expanded (GQA) and cast, the output cast back."""
    def reference(rec, bound, q, k, v, tensors, scale, s0):
        dt, H = compute_dtype(q.dtype), q.shape[1]
        out, state = loop(rec, bound, q.to(dt), expand_kv(k, H).to(dt), expand_kv(v, H).to(dt), tensors, scale, s0)
        return out.to(q.dtype), state
    return reference


def resolve_backend(backend: str, device) -> str:
    """'auto' is Triton on CUDA tensors (when installed) and the chunked torch path otherwise."""
    if backend != "auto":
        return backend
    return "triton" if torch.device(device).type == "cuda" and importlib.util.find_spec("triton") else "cpu"


def matrix_entering_map(run_part, bind_part, rec, q, k, v, dtype):
    """A part's final state is ``A S_in + S_out(0)`` with ``A`` acting on the state's rows (the delta rule's
    ``[Dk, Dk]``, Titans' ``[2 Dk, 2 Dk]`` over the memory and its momentum): the part run from the identity with
    zero values."""
    B, H, _, Dk = q.shape
    rows = RULES[rec.rule].state_rows * Dk
    eye = torch.eye(rows, dtype=dtype, device=q.device).expand(B, H, rows, rows).contiguous()
    zeros = torch.zeros(*k.shape[:3], rows, dtype=v.dtype, device=v.device)
    return "matrix", run_part(k, zeros, eye)


def apply_entering(kind: str, A, state):
    """``A(state)`` of an ``entering_map``."""
    return A @ state if kind == "matrix" else A * state
