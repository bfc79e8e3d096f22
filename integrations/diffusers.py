"""attnc patterns in diffusers video DiTs (Wan, CogVideoX).

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

CogVideoX (``CogVideoXTransformer3DModel``) attends jointly over text + video tokens. With
``"stdlib:neighborhood_3d"`` the video queries attend a 3-D neighborhood of video keys (through
``attnc.na3d``, NATTEN's ``kernel_size``, ``stride``, ``dilation``, ``is_causal``) and every text key (na3d's
``additional_keys``, merged exactly through the log-sum-exps); the text queries attend everything, as in
CogVideoX. Any other pattern is one spec over the joint tokens, laid out as CogVideoX concatenates them:
``tokens seq(text) + grid(t: frames, y: height, x: width)`` (e.g. ``mask q in text or k in text or
neighborhood_3d(...)``, the same attention as the na3d form); ``text`` is the number of text tokens of each
call. The grid is ``(F // p_t, H // p, W // p)`` of the ``[B, F, C, H, W]`` latent (``F`` when the model
has no ``patch_size_t``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.errors import SpecError
from ..runtime.api import BACKENDS, Attention, compile_attention
from .natten import na3d, window_arguments

#: The size names of the grid a pattern must declare: ``grid(t: frames, y: height, x: width)``.
GRID_SIZES = ("frames", "height", "width")


class WanAttncProcessor:
    """Self-attention of a ``WanAttention`` through an attnc pattern on the video token grid.

    Does what diffusers' ``WanAttnProcessor`` does for self-attention (q/k/v projections, q/k RMS
    norms, Wan's interleaved rotary embedding, output projection) with the attention computed by
    ``attention`` (an ``attnc.Attention`` compiled with ``layout="bnhd"``) on the grid in ``grid``
    (``(frames, height, width)``; set by ``apply``'s hook on every transformer call, or by hand)."""

    def __init__(self, attention: Attention, grid: tuple[int, int, int] | None = None, parallel=None) -> None:
        self.attention = attention
        self.grid = grid
        self.parallel = parallel  # an attnc.distributed.ContextParallel: this rank holds its part of the tokens

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, rotary_emb=None, **kwargs) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise SpecError("the attnc processor computes self-attention over the video tokens; it was given "
                            "encoder_hidden_states (cross-attention)", where="argument encoder_hidden_states",
                            hint="apply() installs it only on self-attention layers (attn1)")
        ranks = 1 if self.parallel is None else self.parallel.world
        grid = _checked_grid(self.grid, hidden_states.shape[1] * ranks, attention_mask)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (p.unflatten(2, (attn.heads, -1)) for p in (query, key, value))
        if rotary_emb is not None:
            query, key = _rotate(query, *rotary_emb), _rotate(key, *rotary_emb)
        if self.parallel is not None:  # [B, n/P, H, D] on each rank: context parallel over the whole grid
            _inference_only(hidden_states)
            sizes = dict(zip(GRID_SIZES, grid, strict=True))
            out = self.parallel(*(p.transpose(1, 2) for p in (query, key, value)), sizes=sizes)
            out = out.transpose(1, 2).flatten(2, 3).type_as(query)
        else:
            out = self.attention(*(p.unflatten(1, grid) for p in (query, key, value)))
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
    compiled module they share; None for CogVideoX's ``na3d`` form) and ``remove()`` to restore
    diffusers' processors."""

    def __init__(self, attention: Attention, processors: dict, previous: dict, hooks: list, parallel=None) -> None:
        self.attention, self.processors, self._previous, self._hooks = attention, processors, previous, hooks
        self.parallel = parallel

    def remove(self) -> None:
        """Restore the processors ``apply`` replaced and remove its hooks."""
        for module, processor in self._previous.values():
            module.set_processor(processor)
        for hook in self._hooks:
            hook.remove()
        self._previous, self._hooks = {}, []


class CogVideoXAttncProcessor:
    """CogVideoX's joint text + video attention through attnc.

    Does what diffusers' ``CogVideoXAttnProcessor2_0`` does (projections, q/k norms, rotary embedding on
    the video tokens, output projection, the split into video and text outputs). With ``window`` (``na3d``'s
    keyword arguments) the video queries attend a 3-D neighborhood of the video keys plus every text key
    and the text queries attend all keys; with ``attention`` (an ``attnc.Attention`` compiled with
    ``layout="bnhd"`` on ``tokens seq(text) + grid(t: frames, y: height, x: width)``) the pattern decides
    for every joint token. ``grid`` is the ``(frames, height, width)`` set by ``apply``'s hook."""

    def __init__(self, window: dict | None = None, grid: tuple[int, int, int] | None = None,
                 attention: Attention | None = None, parallel=None) -> None:
        if (window is None) == (attention is None):
            raise SpecError("give either window (na3d's arguments) or attention (a compiled joint pattern)",
                            where="argument attention")
        if parallel is not None and window is None:
            raise SpecError("context parallelism runs CogVideoX's window form (stdlib:neighborhood_3d with na3d's "
                            "arguments), not a joint pattern", where="argument parallel")
        self.window = window
        self.grid = grid
        self.attention = attention
        # an attnc.distributed.ContextParallel of the window over the video grid: this rank holds its part
        # of the video tokens and every text token
        self.parallel = parallel

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb=None, **kwargs):
        ranks = 1 if self.parallel is None else self.parallel.world
        grid = _checked_grid(self.grid, hidden_states.shape[1] * ranks, attention_mask)
        text = encoder_hidden_states.shape[1]
        joint = torch.cat([encoder_hidden_states, hidden_states], dim=1)
        # [B, H, N, D] as diffusers' norms and rotary helper expect
        query, key, value = (p(joint).unflatten(2, (attn.heads, -1)).transpose(1, 2)
                             for p in (attn.to_q, attn.to_k, attn.to_v))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            query = torch.cat([query[:, :, :text], apply_rotary_emb(query[:, :, text:], image_rotary_emb)], dim=2)
            key = torch.cat([key[:, :, :text], apply_rotary_emb(key[:, :, text:], image_rotary_emb)], dim=2)
        q, k, v = (p.transpose(1, 2) for p in (query, key, value))  # [B, N, H, D]
        if self.parallel is not None:
            _inference_only(hidden_states)
            out = _parallel_joint(self.parallel, query, key, value, text, grid).flatten(2, 3)
        elif self.attention is not None:  # one pattern over the joint tokens
            sizes = dict(zip(("text", *GRID_SIZES), (text, *grid), strict=True))
            out = self.attention(q, k, v, sizes=sizes).flatten(2, 3)
        else:
            out_text = F.scaled_dot_product_attention(query[:, :, :text], key, value)  # text attends everything
            out_video = na3d(*(p[:, text:].unflatten(1, grid) for p in (q, k, v)),
                             additional_keys=k[:, :text], additional_values=v[:, :text], **self.window)
            out = torch.cat([out_text.transpose(1, 2), out_video.flatten(1, 3)], dim=1).flatten(2, 3)
        out = attn.to_out[1](attn.to_out[0](out.type_as(query)))
        return out[:, text:], out[:, :text]


def _inference_only(hidden_states: torch.Tensor) -> None:
    """Context parallelism here serves inference: the model's output is gathered whole outside autograd
    (as diffusers' own), so a training step would get no gradient for the blocks; say so instead."""
    if torch.is_grad_enabled() and hidden_states.requires_grad:
        raise SpecError("the diffusers integration's context parallelism serves inference (the output is "
                        "gathered whole outside autograd); this call records gradients",
                        where="argument hidden_states", hint="call the model under torch.no_grad(), or train "
                        "with attnc.distributed.ContextParallel on the attention directly")


def _parallel_joint(parallel, query, key, value, text: int, grid) -> torch.Tensor:
    """CogVideoX's joint attention with the video tokens sharded over ``parallel``'s ranks and the text
    tokens on every rank (``[B, H, text + this rank's video, D]``): the video queries attend the 3-D window
    of every rank's video keys (context parallel, with its lse) and every text key; the text queries attend
    every key, their partial results over each rank's video keys gathered from every rank. Each part is
    merged exactly through the log-sum-exps. Returns ``[B, text + video, H, Dv]``."""
    from ..runtime.numerics import merge_by_lse
    from ..runtime.parallel import collectives as C
    from .natten import _extra_segment

    scale = query.shape[-1] ** -0.5
    text_q, text_k, text_v = (p[:, :, :text] for p in (query, key, value))
    video_q, video_k, video_v = (p[:, :, text:] for p in (query, key, value))

    def dense(q, k, v):  # [B, H, N, D] queries over every given key: out [B, H, N, Dv], lse [B, H, N]
        out, lse = _extra_segment(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale)
        return out.transpose(1, 2), lse.transpose(1, 2)

    window, window_lse = parallel(video_q, video_k, video_v, sizes=dict(zip(GRID_SIZES, grid, strict=True)),
                                  return_lse=True)
    extra, extra_lse = dense(video_q, text_k, text_v)
    video, _ = merge_by_lse(window.to(extra.dtype), window_lse.to(extra_lse.dtype), extra, extra_lse)
    out, lse = dense(text_q, text_k, text_v)
    mine, mine_lse = dense(text_q, video_k, video_v)  # over this rank's video keys
    for part, part_lse in zip(C.all_gather(mine, parallel.group), C.all_gather(mine_lse, parallel.group),
                              strict=True):
        out, lse = merge_by_lse(out, lse, part, part_lse)
    return torch.cat([out, video], dim=2).transpose(1, 2).to(query.dtype)


def _checked_grid(grid, n: int, attention_mask) -> tuple[int, int, int]:
    """The grid a processor was given, checked against its ``n`` video tokens; a processor call takes
    no ``attention_mask`` (the pattern is the mask)."""
    if attention_mask is not None:
        raise SpecError("an attention_mask cannot be combined with the attnc processor: the pattern is the mask",
                        where="argument attention_mask")
    if grid is None:
        raise SpecError("the token grid (frames, height, width) is unknown", where="argument hidden_states",
                        hint="call the transformer that apply() was given, or set processor.grid = (T, Y, X)")
    t, y, x = grid
    if t * y * x != n:
        raise SpecError(f"{n} tokens do not fill the grid frames x height x width = {t} x {y} x {x}",
                        where="argument hidden_states")
    return grid


def _self_attentions(transformer) -> dict:
    """The self-attention modules of a Wan transformer, by name."""
    from diffusers.models.transformers.transformer_wan import WanAttention

    return {name: m for name, m in transformer.named_modules()
            if isinstance(m, WanAttention) and not m.is_cross_attention}


def _cogvideox_attentions(transformer) -> dict:
    """The joint text + video attention modules of a CogVideoX transformer (diffusers' unfused processor), by name."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    return {name: m for name, m in transformer.named_modules()
            if isinstance(getattr(m, "processor", None), CogVideoXAttnProcessor2_0)}


#: NATTEN's keyword arguments, the only parameters of the CogVideoX processor.
_WINDOW_PARAMS = ("kernel_size", "stride", "dilation", "is_causal")


def _window_arguments(params: dict, backend: str) -> dict:
    """CogVideoX's window form: ``na3d``'s keyword arguments (NATTEN's, checked) and the backend."""
    for key in params:
        if key not in _WINDOW_PARAMS:
            raise SpecError(f"unknown parameter {key!r}", where=f"argument {key}",
                            hint="NATTEN's: " + ", ".join(_WINDOW_PARAMS))
    if "kernel_size" in params:  # checked here, not at the first forward (the fit to the grid is checked there)
        window_arguments(3, **params)
    return {**params, "backend": backend}


def _cogvideox_parallel(window: dict, ulysses: int, kv: str):
    """The ``ContextParallel`` runner of CogVideoX's video queries in the window form (``window``:
    ``_window_arguments``): ``stdlib:neighborhood_3d`` with its arguments, Ulysses over ``ulysses`` ranks."""
    from ..distributed import ContextParallel

    if "kernel_size" not in window:  # as na3d, which the one-process path calls
        raise SpecError("missing kernel_size", where="argument kernel_size",
                        hint="NATTEN's window per axis, e.g. kernel_size=(3, 7, 7)")
    video = compile_attention("stdlib:neighborhood_3d", backend=window["backend"],
                              **{k: v for k, v in window.items() if k != "backend"})
    return ContextParallel(video, ulysses_degree=ulysses, kv=kv)


def apply(transformer, pattern="stdlib:neighborhood_3d", *, backend: str = "auto", name: str | None = None,
          parallel_config=None, kv: str = "ring", **params) -> Installed:
    """Run the self-attention of a diffusers video DiT through an attnc pattern on its token grid.

    ``WanTransformer3DModel``: ``pattern`` is a loaded pattern, a path, ``"stdlib:NAME"`` or spec text
    (``name=`` and keyword parameters as in ``attnc.compile_attention``, e.g. NATTEN's ``kernel_size``,
    ``stride``, ``dilation``, ``is_causal`` for ``stdlib:neighborhood_3d``) whose tokens are
    ``grid(t: frames, y: height, x: width)``; one compiled module is shared by every layer.
    ``CogVideoXTransformer3DModel``: ``"stdlib:neighborhood_3d"`` with NATTEN's keyword arguments for
    the video queries (plus every text key); text queries attend everything. Or a pattern over the joint
    tokens, ``tokens seq(text) + grid(t: frames, y: height, x: width)`` (text first, as CogVideoX
    concatenates them), compiled once and shared by every layer.
    The grid extents come from each call's latent and the model's patch size. Returns an ``Installed``
    handle (``.remove()`` undoes it).

    ``parallel_config``: a diffusers ``ContextParallelConfig(ring_degree=r, ulysses_degree=u)``
    with ``r * u`` the world size of torch.distributed's default group (initialised). Every rank then
    holds its part of the tokens from the first block to the output projection, as diffusers' own
    context parallelism splits them (the model's ``_cp_plan``: hidden states, rotary embedding,
    per-token timesteps), and each self-attention runs ``attnc.distributed.ContextParallel`` (Ulysses
    inside groups of u ranks, ``kv="ring"`` or ``"allgather"`` across them, only the key shards the
    pattern reads). The output is gathered whole on every rank. The config's ``rotate_method`` is not
    read: ``kv`` says how keys cross ranks. CogVideoX (no ``_cp_plan``; the window form only): its video
    tokens are split along the frames before the first block and gathered after the last, its text
    tokens stay whole on every rank (``_parallel_joint``). Inference only: the gathered output is
    outside autograd, as in diffusers' own context parallelism, so a call that records gradients is
    refused."""
    try:
        from diffusers import CogVideoXTransformer3DModel, WanTransformer3DModel
    except ImportError as err:  # pragma: no cover - exercised only without diffusers
        raise SpecError("attnc.integrations.diffusers needs diffusers installed", where="argument transformer") from err
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise SpecError(f"unknown or unavailable backend {backend!r}", where="argument backend",
                        hint="available in this version: " + ", ".join(BACKENDS))
    # A second apply would wrap attnc's processors and hooks in more of them (two grid hooks, a remove()
    # that restores the first apply's processors): it is refused, and the first handle stays valid.
    if any(isinstance(getattr(m, "processor", None), WanAttncProcessor | CogVideoXAttncProcessor)
           for m in getattr(transformer, "modules", lambda: ())()):
        raise SpecError(f"this {type(transformer).__name__} already runs an attnc pattern (apply was called on it "
                        "before)", where="argument transformer",
                        hint="call .remove() on the handle the first apply returned, then apply again")
    if isinstance(transformer, WanTransformer3DModel):
        attention, window, modules, make, to_grid = _wan_setup(transformer, pattern, backend, name, params)
    elif isinstance(transformer, CogVideoXTransformer3DModel):
        attention, window, modules, make, to_grid = _cogvideox_setup(transformer, pattern, backend, name, params)
    else:
        raise SpecError(f"expected a diffusers WanTransformer3DModel or CogVideoXTransformer3DModel, got "
                        f"{type(transformer).__name__}", where="argument transformer")
    if not modules:
        raise SpecError("no attention module with diffusers' default processor was found",
                        where="argument transformer")
    parallel = None
    if parallel_config is not None:
        parallel, make = _parallel_setup(isinstance(transformer, WanTransformer3DModel), attention, window,
                                         parallel_config, kv)
    processors, previous = {}, {}
    for module_name, module in modules.items():
        previous[module_name] = (module, module.processor)
        processors[module_name] = make()
        module.set_processor(processors[module_name])

    def set_grid(_module, args, kwargs):
        latent = args[0] if args else kwargs.get("hidden_states")
        if not isinstance(latent, torch.Tensor) or latent.dim() != 5:
            return  # diffusers itself reports a bad latent
        grid = tuple(int(e) for e in to_grid(latent.shape))
        for processor in processors.values():
            processor.grid = grid

    hooks = [transformer.register_forward_pre_hook(set_grid, with_kwargs=True)]
    if parallel is not None:
        split = _split_hooks if isinstance(transformer, WanTransformer3DModel) else _cogvideox_split_hooks
        hooks += split(transformer, parallel, processors)
    return Installed(attention, processors, previous, hooks, parallel)


def _wan_setup(transformer, pattern, backend: str, name, params: dict):
    """Wan: one compiled pattern over the token grid, shared by every self-attention; ``(attention, window,
    modules, make, to_grid)`` as ``apply`` uses them."""
    attention = compile_attention(pattern, backend=backend, name=name, layout="bnhd", **params)
    _check_grid(attention)
    patch = tuple(int(p) for p in transformer.config.patch_size)

    def to_grid(shape):
        return tuple(e // p for e, p in zip(shape[2:], patch, strict=True))

    return attention, None, _self_attentions(transformer), lambda: WanAttncProcessor(attention), to_grid


def _cogvideox_setup(transformer, pattern, backend: str, name, params: dict):
    """CogVideoX: NATTEN's window over the video with every text key (``stdlib:neighborhood_3d``'s arguments), or
    a pattern over the joint text + video tokens; ``(attention, window, modules, make, to_grid)``."""
    if pattern == "stdlib:neighborhood_3d" and name is None:  # na3d with the text as additional keys
        attention, window = None, _window_arguments(params, backend)
        make = lambda: CogVideoXAttncProcessor(window)  # noqa: E731
    else:
        attention, window = compile_attention(pattern, backend=backend, name=name, layout="bnhd", **params), None
        _check_joint(attention)
        make = lambda: CogVideoXAttncProcessor(attention=attention)  # noqa: E731
    p, p_t = int(transformer.config.patch_size), transformer.config.patch_size_t

    def to_grid(shape):
        return shape[1] // (p_t or 1), shape[3] // p, shape[4] // p

    return attention, window, _cogvideox_attentions(transformer), make, to_grid


def _parallel_setup(wan: bool, attention, window, parallel_config, kv: str):
    """``parallel_config``'s context parallelism: ``(parallel, make)``, the processors' maker running it."""
    from ..distributed import ContextParallel

    ulysses = _degrees(parallel_config)[1]
    if wan:
        parallel = ContextParallel(attention, ulysses_degree=ulysses, kv=kv)
        return parallel, lambda: WanAttncProcessor(attention, parallel=parallel)
    if attention is not None:
        raise SpecError("context parallelism runs CogVideoX's window form (stdlib:neighborhood_3d with "
                        "na3d's arguments); a joint text + video pattern is not sharded",
                        where="argument parallel_config", hint="use stdlib:neighborhood_3d, kernel_size=...")
    parallel = _cogvideox_parallel(window, ulysses, kv)
    return parallel, lambda: CogVideoXAttncProcessor(window, parallel=parallel)


def _degrees(config) -> tuple[int, int]:
    """(ring, Ulysses) degrees of a diffusers ``ContextParallelConfig``, checked against the world size."""
    import torch.distributed as dist

    ring, ulysses = (getattr(config, name, None) or 1 for name in ("ring_degree", "ulysses_degree"))
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in (ring, ulysses)):
        raise SpecError(f"ring_degree and ulysses_degree must be positive ints, got {ring!r} and {ulysses!r}",
                        where="argument parallel_config")
    if not dist.is_available() or not dist.is_initialized():
        raise SpecError("torch.distributed is not initialized", where="argument parallel_config",
                        hint="call torch.distributed.init_process_group first (one process per device)")
    if ring * ulysses != dist.get_world_size():
        raise SpecError(f"ring_degree x ulysses_degree = {ring} x {ulysses} is not the world size "
                        f"{dist.get_world_size()}", where="argument parallel_config")
    return ring, ulysses


def _split_hooks(transformer, parallel, processors: dict) -> list:
    """Hooks that shard the token dimension where the model's ``_cp_plan`` says (inputs of a module, or
    its outputs) and gather it where the plan gathers, in the order of ``parallel`` (a grid's tokens in
    contiguous runs of frames, so this is diffusers' own split)."""
    plan = getattr(type(transformer), "_cp_plan", None)
    if not plan:
        raise SpecError(f"{type(transformer).__name__} has no context-parallel plan (_cp_plan)",
                        where="argument parallel_config")
    first = next(iter(processors.values()))

    def sizes():
        return dict(zip(GRID_SIZES, first.grid, strict=True))

    def split(x, spec):
        if not isinstance(x, torch.Tensor) or (spec.expected_dims is not None and x.dim() != spec.expected_dims):
            return x
        return parallel.shard(x, dim=spec.split_dim, sizes=sizes())

    hooks = []
    modules = dict(transformer.named_modules())
    for name, entry in plan.items():
        module = modules[name]
        if hasattr(entry, "gather_dim"):  # an output gathered whole on every rank
            def gather(_m, _args, out, spec=entry):
                if isinstance(out, torch.Tensor) and (spec.expected_dims is None or out.dim() == spec.expected_dims):
                    return parallel.unshard(out, dim=spec.gather_dim, sizes=sizes())
                return out
            hooks.append(module.register_forward_hook(gather))
            continue
        outputs = {k: v for k, v in entry.items() if v.split_output}
        inputs = {k: v for k, v in entry.items() if not v.split_output}
        if outputs:
            def split_out(_m, _args, out, specs=outputs):
                items = list(out) if isinstance(out, tuple | list) else [out]
                for index, spec in specs.items():
                    items[index] = split(items[index], spec)
                return type(out)(items) if isinstance(out, tuple | list) else items[0]
            hooks.append(module.register_forward_hook(split_out))
        if inputs:
            import inspect

            params = list(inspect.signature(module.forward).parameters)

            def split_in(_m, args, kwargs, specs=inputs, params=params):
                args = list(args)
                for key, spec in specs.items():
                    _replace_argument(params, args, kwargs, key, lambda x, spec=spec: split(x, spec))
                return tuple(args), kwargs
            hooks.append(module.register_forward_pre_hook(split_in, with_kwargs=True))
    return hooks


def _replace_argument(params: list[str], args: list, kwargs: dict, key: str, fn) -> None:
    """``fn`` applied to the call's argument ``key`` where it was given, by keyword or by position
    (``params``: the forward's parameter names), in place."""
    if key in kwargs:
        kwargs[key] = fn(kwargs[key])
    elif key in params and params.index(key) < len(args):
        args[params.index(key)] = fn(args[params.index(key)])


def _cogvideox_split_hooks(transformer, parallel, processors: dict) -> list:
    """CogVideoX has no ``_cp_plan``: its blocks get the video tokens (``hidden_states``) and the rotary
    embedding of the video tokens split into each rank's part (in ``parallel``'s order: contiguous runs
    of the grid's tokens, along the frames) and the text tokens whole; the last block's video output is
    gathered whole on every rank (norms, projection and unpatchify then run on all of it, as on one
    process)."""
    import inspect

    first = next(iter(processors.values()))
    blocks = list(transformer.transformer_blocks)
    params = list(inspect.signature(blocks[0].forward).parameters)

    def whole_tokens() -> int:
        t, y, x = first.grid
        return t * y * x

    def sizes():
        return dict(zip(GRID_SIZES, first.grid, strict=True))

    def split(value, dim: int):
        """This rank's part of a whole tensor (or each of a tuple's: the rotary cos and sin); a part
        already split (the blocks after the first) or anything else as it is."""
        parts = value if isinstance(value, tuple | list) else (value,)
        if not all(isinstance(p, torch.Tensor) and p.shape[dim] == whole_tokens() for p in parts):
            return value
        split_parts = [parallel.shard(p, dim=dim, sizes=sizes()) for p in parts]
        return type(value)(split_parts) if isinstance(value, tuple | list) else split_parts[0]

    def split_in(_m, args, kwargs):
        args = list(args)
        for key, dim in (("hidden_states", 1), ("image_rotary_emb", 0)):
            _replace_argument(params, args, kwargs, key, lambda x, dim=dim: split(x, dim))
        return tuple(args), kwargs

    def gather(_m, _args, out):
        video, text = out
        return parallel.unshard(video, dim=1, sizes=sizes()), text

    hooks = [block.register_forward_pre_hook(split_in, with_kwargs=True) for block in blocks]
    hooks.append(blocks[-1].register_forward_hook(gather))
    return hooks


def _check_grid(attention: Attention) -> None:
    """The pattern must be a self-attention on a 3-axis grid sized by frames, height and width."""
    from ..core import ir
    from ..core.symbols import size_symbol

    pat = attention.pattern
    if not isinstance(pat, ir.PatternIR):
        raise SpecError(f"'{pat.name}' is {ir.what_it_is(pat)}; a video DiT needs a softmax pattern",
                        where="argument pattern")
    queries, keys = pat.queries, pat.keys
    sizes = tuple(size for _, size in queries.axes)
    if queries.kind != "grid" or keys != queries or sizes != tuple(size_symbol(s) for s in GRID_SIZES):
        raise SpecError(f"'{pat.name}' must attend within one grid(t: frames, y: height, x: width)",
                        where="argument pattern",
                        hint="the grid extents are read from the latent: frames, height, width"
                        + (" (a concatenation with text tokens is for CogVideoX)" if queries.segments else ""))


def _check_joint(attention: Attention) -> None:
    """The pattern must be a self-attention on ``seq(text) + grid(AXIS: frames, AXIS: height, AXIS: width)``."""
    from ..core import ir
    from ..core.symbols import size_symbol

    pat = attention.pattern
    if not isinstance(pat, ir.PatternIR):
        raise SpecError(f"'{pat.name}' is {ir.what_it_is(pat)}; a video DiT needs a softmax pattern",
                        where="argument pattern")
    segments = pat.queries.segments
    shape = [(seg.kind, seg.size if seg.kind == "seq" else tuple(e for _, e in seg.axes)) for seg in segments]
    want = [("seq", size_symbol("text")), ("grid", tuple(size_symbol(s) for s in GRID_SIZES))]
    if pat.keys != pat.queries or shape != want:
        raise SpecError(f"'{pat.name}' must lay out CogVideoX's joint tokens as "
                        f"seq(text) + grid(t: frames, y: height, x: width), got {pat.queries.describe()}",
                        where="argument pattern",
                        hint="text first, as CogVideoX concatenates them; the sizes are read from each call")
