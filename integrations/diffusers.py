"""attnc patterns in diffusers video DiTs (Wan).

``apply(transformer, "stdlib:neighborhood_3d", kernel_size=(3, 7, 7))`` replaces the processor of
every self-attention of a ``WanTransformer3DModel`` with an attnc processor and installs a forward
pre-hook on the transformer that reads the token grid of each call from the latent: ``hidden_states``
``[B, C, F, H, W]`` and the model's ``patch_size`` ``(p_t, p_h, p_w)`` give the grid
``(frames, height, width) = (F // p_t, H // p_h, W // p_w)``, the sizes of the pattern's
``grid(t: frames, y: height, x: width)``. Wan flattens its patches row-major (frames slowest, width
fastest), as attnc orders a grid's tokens, so the ``[B, N, H, D]`` projections are viewed as
``[B, T, Y, X, H, D]`` without a copy (``layout="bnhd"``).

Cross-attention (text, image context) keeps diffusers' own processor. The returned handle's
``remove()`` restores the processors it replaced and removes the hook.
"""

from __future__ import annotations

import torch

from ..runtime.api import BACKENDS, Attention, compile_attention
from ..spec.errors import SpecError

#: The size names of the grid a pattern must declare: ``grid(t: frames, y: height, x: width)``.
GRID_SIZES = ("frames", "height", "width")


class WanAttncProcessor:
    """Self-attention of a ``WanAttention`` through an attnc pattern on the video token grid.

    Does what diffusers' ``WanAttnProcessor`` does for self-attention (q/k/v projections, q/k RMS
    norms, Wan's interleaved rotary embedding, output projection) with the attention computed by
    ``attention`` (an ``attnc.Attention`` compiled with ``layout="bnhd"``) on the grid in ``grid``
    (``(frames, height, width)``; set by ``apply``'s hook on every transformer call, or by hand)."""

    def __init__(self, attention: Attention, grid: tuple[int, int, int] | None = None) -> None:
        self.attention = attention
        self.grid = grid

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise SpecError("the attnc processor computes self-attention over the video tokens; it was given "
                            "encoder_hidden_states (cross-attention)", where="argument encoder_hidden_states",
                            hint="apply() installs it only on self-attention layers (attn1)")
        if attention_mask is not None:
            raise SpecError("an attention_mask cannot be combined with the attnc processor: the pattern is the mask",
                            where="argument attention_mask")
        if self.grid is None:
            raise SpecError("the token grid (frames, height, width) is unknown", where="argument hidden_states",
                            hint="call the transformer that apply() was given, or set processor.grid = (T, Y, X)")
        n = hidden_states.shape[1]
        t, y, x = self.grid
        if t * y * x != n:
            raise SpecError(f"{n} tokens do not fill the grid frames x height x width = {t} x {y} x {x}",
                            where="argument hidden_states")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (p.unflatten(2, (attn.heads, -1)) for p in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        out = self.attention(*(p.unflatten(1, self.grid) for p in (query, key, value)))
        out = out.flatten(1, 3).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _rotate(h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Wan's rotary embedding: each channel pair (2i, 2i + 1) turned by the angle whose cosine and sine
    diffusers stores repeated per pair (so the even entries of ``cos`` and the odd of ``sin`` are used)."""
    even, odd = h[..., 0::2], h[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).type_as(h)


class Installed:
    """What ``apply`` changed: ``processors`` (module name -> attnc processor), ``attention`` (the one
    compiled module they share) and ``remove()`` to restore diffusers' processors."""

    def __init__(self, attention: Attention, processors: dict, previous: dict, hook) -> None:
        self.attention, self.processors, self._previous, self._hook = attention, processors, previous, hook

    def remove(self) -> None:
        """Restore the processors ``apply`` replaced and remove its hook."""
        for module, processor in self._previous.values():
            module.set_processor(processor)
        self._hook.remove()
        self._previous = {}


def _self_attentions(transformer) -> dict:
    """The self-attention modules of a Wan transformer, by name."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    return {name: m for name, m in transformer.named_modules()
            if isinstance(m, WanAttention) and not m.is_cross_attention}


def apply(transformer, pattern="stdlib:neighborhood_3d", *, backend: str = "auto", name: str | None = None,
          **params) -> Installed:
    """Run every self-attention of a diffusers ``WanTransformer3DModel`` through an attnc pattern.

    ``pattern``: a loaded pattern, a path, ``"stdlib:NAME"`` or spec text (``name=`` and keyword
    parameters as in ``attnc.compile_attention``, e.g. NATTEN's ``kernel_size``, ``stride``,
    ``dilation``, ``is_causal`` for ``stdlib:neighborhood_3d``). Its tokens must be
    ``grid(t: frames, y: height, x: width)``; the extents come from each call's latent and the
    model's ``patch_size``. One compiled module is shared by every layer. Returns an ``Installed``
    handle (``.remove()`` undoes it)."""
    try:
        from diffusers import WanTransformer3DModel
    except ImportError as err:  # pragma: no cover - exercised only without diffusers
        raise SpecError("attnc.integrations.diffusers needs diffusers installed", where="argument transformer") from err
    if not isinstance(transformer, WanTransformer3DModel):
        raise SpecError(f"expected a diffusers WanTransformer3DModel, got {type(transformer).__name__}",
                        where="argument transformer")
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise SpecError(f"unknown or unavailable backend {backend!r}", where="argument backend",
                        hint="available in this version: " + ", ".join(BACKENDS))
    attention = compile_attention(pattern, backend=backend, name=name, layout="bnhd", **params)
    _check_grid(attention)
    patch = tuple(int(p) for p in transformer.config.patch_size)
    processors, previous = {}, {}
    for module_name, module in _self_attentions(transformer).items():
        previous[module_name] = (module, module.processor)
        processors[module_name] = WanAttncProcessor(attention)
        module.set_processor(processors[module_name])

    def set_grid(_module, args, kwargs):
        latent = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(latent, torch.Tensor) or latent.dim() != 5:
            return  # diffusers itself reports a bad latent
        grid = tuple(int(e) // p for e, p in zip(latent.shape[2:], patch, strict=True))
        for processor in processors.values():
            processor.grid = grid

    hook = transformer.register_forward_pre_hook(set_grid, with_kwargs=True)
    return Installed(attention, processors, previous, hook)


def _check_grid(attention: Attention) -> None:
    """The pattern must be a self-attention on a 3-axis grid sized by frames, height and width."""
    from ..compiler import ir
    from ..compiler.symbols import size_symbol

    pat = attention.pattern
    if not isinstance(pat, ir.PatternIR):
        raise SpecError(f"'{pat.name}' is a recurrence; a video DiT needs a softmax pattern", where="argument pattern")
    queries, keys = pat.queries, pat.keys
    sizes = tuple(size for _, size in queries.axes)
    if queries.kind != "grid" or keys != queries or sizes != tuple(size_symbol(s) for s in GRID_SIZES):
        raise SpecError(f"'{pat.name}' must attend within one grid(t: frames, y: height, x: width)",
                        where="argument pattern",
                        hint="the grid extents are read from the latent: frames, height, width")
