"""The dQ kernel's pass of the bias inputs' gradients (``ADD_GRADS``): at each place the bias reads a float input, dS
times d bias / d (the value read), added to the input's fp32 gradient buffer by atomics (``_bias_grads``), summed
first along the tile axes the place does not vary along. Its parameters, its call and the helper it calls, for
``source.KernelSource``; the runtime side is ``runtime.backends.triton.backward._bias_grad_buffers``."""

from __future__ import annotations

from ....core import symbols as S
from .bias import bias_input_names, bias_input_sites
from .kernels import indent
from .signature import Param, tensor


class BiasGradLines:
    """A part of ``KernelSource``: reads its pattern, bias, inputs, printer and tile axes."""

    def _print_grad_sites(self) -> None:
        """The bias inputs' gradients as the dQ kernel adds them (``_bias_grads``): for each place the bias reads a
        float input, its slot, the text of d bias / d (value read), of the place's offset in the gradient buffer,
        and whether the offset varies along the tile's queries and its keys (dS times the derivative is summed along
        the others before the atomic add: a per-query input takes one add per query, not one per pair); with the
        inputs those texts read (``grad_inputs``)."""
        self.grad_sites: list[tuple] = []
        self.grad_inputs: list[int] = []
        names = bias_input_names(self.pat) if self.bias is not None else set()
        if not names:
            return
        q_side = {S.Q} | {S.coord("q", a) for i, a in enumerate(self.pat.queries.axis_names) if i not in self.q_uniform}
        k_side = {S.K} | {S.coord("k", a) for i, a in enumerate(self.pat.keys.axis_names) if i not in self.k_uniform}
        for site, deriv in bias_input_sites(self.bias, names):
            slot = self.inputs[S.input_name(site.func)]
            reads = set().union(*(a.free_symbols for a in site.args)) if site.args else set()
            offset = self.printer.input_offset(slot, site.args, slot.grad_strides())
            self.grad_sites.append((slot, self.printer.float_expr(deriv), offset, bool(reads & q_side),
                                    bool(reads & k_side)))
        self.grad_inputs = sorted(self.printer.used_inputs)
        self.printer.used_inputs = set()

    def _grad_slots(self) -> list:
        """The slots of the inputs whose gradients the pass adds, in the inputs' order."""
        added = {slot.index for slot, *_ in self.grad_sites}
        return [slot for slot in self.inputs.values() if slot.index in added]

    def _stores_ds(self) -> bool:
        """Whether the dQ kernel may make the gradients of float inputs of the bias (``bias.bias_input_names``, the
        rule the backward asks it by): add them itself (``ADD_GRADS``, ``_bias_grads``) or store dS per pair for the
        host (``STORE_DS``, torch's deterministic mode); else it has no such lines and takes no such buffers. Not
        where the bias bound to the call's sizes reads no such input (``grad_sites`` empty: a factor of the sizes
        folded to 0): the gradients are 0, the buffers' zeros (a second pass of such a kernel stores dQ again)."""
        return self.pat.bias is not None and bool(bias_input_names(self.pat)) and bool(self.grad_sites)

    def _grad_params(self) -> list[Param]:
        """The gradient buffers ``_bias_grads`` adds to: one per float input of the bias, its batch stride first."""
        return [tensor(f"GIN{s.index}", f"gin{s.index}_sb", *(f"gin{s.index}_s{j}" for j in range(len(s.dims))))
                for s in self._grad_slots()]

    def _grad_extents(self, slot) -> list[str]:
        """A gradient buffer's run-time extents of its input (its offsets are clamped to them), unless the
        derivative reads that input, whose parameters already carry them (a name twice is a syntax error)."""
        return [] if slot.index in self.grad_inputs else slot.extents()

    def _grad_call(self) -> str:
        """``_bias_grads``'s call: dS, the positions, head and inputs it reads, the buffers at this batch element
        with their strides and a block's run-time extents of their inputs (``_grad_extents``)."""
        grads = [", ".join([f"GIN{s.index} + batch.to(tl.int64) * gin{s.index}_sb",
                            *(f"gin{s.index}_s{j}" for j in range(len(s.dims))), *self._grad_extents(s)])
                 for s in self._grad_slots()]
        return f"_bias_grads(ds, {self._call_args(self.grad_inputs)}, {', '.join(grads)})"

    def _bias_grads_fn(self) -> str:
        """``_bias_grads``: for each place the bias reads a float input, dS times d bias / d (value read), summed
        along the tile's axes the place does not vary along, added by fp32 atomics (their order varies between
        runs: torch's deterministic mode takes dS to the host)."""
        grads = [", ".join([f"G{s.index}", *s.grad_strides(), *self._grad_extents(s)]) for s in self._grad_slots()]
        params = f"ds, {self._helper_args(self.grad_inputs)}, " + ", ".join(grads)
        lines = []
        for slot, deriv, offset, by_q, by_k in self.grad_sites:
            live = "ds != 0.0"  # attended pairs (the derivative may be anything elsewhere)
            if by_q and by_k:
                lines.append(f"g = ds * ({deriv})  # dS x d bias / d input{slot.index}")
            else:
                lines.append(f"g = tl.where({live}, ds * ({deriv}), 0.0)  # dS x d bias / d input{slot.index}")
                if not by_k:  # the same place for every key of a query: one add per query (or per tile)
                    lines.append("g = tl.reduce(g, 1, _add)[:, None]" if by_q else
                                 "g = tl.reduce(tl.reduce(g, 1, _add), 0, _add)")
                else:  # the same place for every query of a key: one add per key
                    lines.append("g = tl.reduce(g, 0, _add)[None, :]")
                live = "g != 0.0"
            # relaxed: a sum needs no ordering (the default acq_rel fences every add)
            lines.append(f"tl.atomic_add(G{slot.index} + {offset}, g, mask={live}, sem=\"relaxed\")")
        return (f"\n\n@triton.jit\ndef _bias_grads({params}):\n"
                '    """Adds dS x d bias / d input where the bias reads each float input (its gradient, fp32)."""\n'
                + indent(lines, 4) + "\n")
