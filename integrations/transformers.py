"""attnc patterns as HuggingFace transformers attention implementations.

``register(name, pattern, **params)`` makes ``attn_implementation=name`` run the
pattern in every attention layer of a transformers (>= 5.23, the version tested) model::

    from attnc.integrations.transformers import register
    register("attnc_swa", "stdlib:sliding_window", window=1024)
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attnc_swa")

What each layer computes is the pattern's mask ANDed with what the model itself
imposes on that layer, so that a causal pattern reproduces the model exactly:

* padding: the 2-D ``attention_mask`` reaches the layer through the mask
  function registered under the same name in ``AttentionMaskInterface`` (HF
  skips mask creation for names it does not know there) as the layer's keys'
  padding, bool ``[B, 1, 1, keys]`` (None when no key is padding), and becomes a
  per-batch key input (``hf_key_padding[k] != 0``). A 2-D ``[B, keys]`` mask
  handed to the attention function directly is taken the same way; other masks
  (HF's 4-D masks of sdpa or eager, custom ones) are refused. A query row whose
  keys are all padding (a left-padded position) comes out as zeros, never NaN;
  HF never reads it. Left padding moves a row's tokens to later positions: a
  pattern that reads positions, not only ``q - k`` (``reads_positions``: sinks,
  a route's blocks, a window clamped at the sequence's ends, a size), runs each
  row that starts with padding alone on its tokens (``_left_padded``: a host read
  of the padding, a call per such row), as the row would run unpadded.
* the layer's sliding window (``sliding_window=`` from Mistral or Gemma 2's
  sliding layers): ``q - k < sliding_window``, HF's own rule;
* the layer's logit softcap (Gemma 2's ``attn_logit_softcapping``) and scaling
  (``query_pre_attn_scalar``). A pattern with its own softcap must agree.
* the KV cache: with ``nk > n`` keys the queries are the last ``n`` positions
  (attnc's decoding rule), which is where HF's dynamic caches put them. HF's
  sliding layers keep only their last keys (``sliding_window - 1``, or
  ``sliding_window`` in a static cache); positions there are relative to the kept
  keys, which changes nothing for a pattern that depends on ``q - k`` only
  (causal, windows, dilation) but moves absolute positions (``k < sinks``): use
  such a pattern on full-attention layers.
* static caches (``generate(..., cache_implementation="static")``): a layer gets
  its whole preallocated buffer, the queries somewhere inside it. The mask
  function (which HF calls once per forward and layer kind, with the queries'
  offset) reads where the queries end (a host read of the cache's length) and
  returns the padding of the filled keys only, ``[B, 1, 1, filled]`` bool; the
  attention function runs on the buffer's first ``filled`` keys (a view), so the
  queries are again the last ones. A 4-D mask passes HF's mask preparation
  unchanged, which matters where ``generate`` prepares the masks of a static
  cache before the forward (it would otherwise read a 2-D result as a new 2-D
  padding mask). On a GPU ``generate`` compiles the forward of a static cache
  (``mode="reduce-overhead"``): these host reads break the graph there
  (``disable_compile=True`` runs it eagerly).
* HF's paged cache (continuous batching: ``model.generate_batch(...)``,
  ``generate(..., cache_implementation="paged")``). A registered name runs there
  too, with no other step. What transformers 5.24 hands the layer on that path
  (``generation/continuous_batching/``): one packed batch of every scheduled
  request, q ``[1, H, total_q, D]``, k and v ``[1, Hkv, total_k, D]`` with
  ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (int32 cumulative counts, one row per
  request, prefill chunks beside single decode tokens), ``max_length_q`` /
  ``max_length_k``, ``cache``, ``read_index`` / ``write_index`` and
  ``block_table=None``, and no attention mask. Before the call the model's
  ``cache.update`` has written the new keys and values into HF's pages
  (``write_index``) and gathered each request's keys, oldest first, its present
  ones last (``read_index``), into that packed k and v; HF's sliding layers keep a
  request's last keys only (positions relative to them again). The pages
  themselves (``block_table``, ``k_cache``, ``v_cache``) reach only flash-attention
  2/3 on CUDA or XPU, so attnc serves the gathered keys: each request's queries are
  the last of its keys (attnc's KV-cache rule), the gathered keys read as a pool
  of one-key pages (``[total_k, 1, Hkv, D]``, a view; ``block_table=`` each row's
  key offsets, ``cache_seqlens=`` its key count). On a backend that reads pages in
  its kernel (Triton's ``attnc_fwd_paged``) and with no gradient asked, a layer
  call is one paged call of one launch, each row's queries given by
  ``cu_seqlens_q=`` (HF's ``cu_seq_lens_q``) and ``max_seqlen_q=`` (HF's
  ``max_length_q``, rounded up to a power of two, as the table's width from
  ``max_length_k``, so that one plan serves many steps): the table and the
  lengths made on the device, nothing read on the host. Otherwise a batch whose
  rows have as many queries as keys (a prefill of new requests, or padding-free
  packed training) is one ``cu_seqlens=`` call, and the others share one paged
  call per query count (every decode row: one).
  The offsets are read on the host once per layer call there (and the paged call
  reads its table and lengths), so such a step cannot be captured in a CUDA graph:
  HF leaves its graphs off by default for a name it does not know, and asking
  for them (``use_cuda_graph=True``) is not supported; under HF's compile
  (``default_compile_level``) the paged call is a graph break. Rows past
  ``cu_seq_lens_q[-1]`` (padding) come out as zeros. The paged call is forward
  only, so is this path's training use with keys beyond the queries.

  The one hook: transformers 5.24 admits a model to continuous batching only
  if its implementation is ``"paged|eager"``, ``"sdpa"`` or a name containing
  ``flash`` (``ContinuousBatchingManager.switch_to_cb_friendly_attn``,
  ``continuous_api.py``, called by the manager's ``__init__`` and again when
  ``init_continuous_batching`` reuses a kept manager); anything else raises
  ``ValueError``. ``paged|NAME`` does not route either: HF strips the prefix
  and checks ``NAME``. A ``flash`` name is no way out, as HF then loads it as a
  flash-attention kernel (``lazy_import_flash_attention``, from the hub for
  names it does not know). So ``register`` wraps that public method once per
  process: a model whose ``config._attn_implementation`` is a name registered
  here is admitted as it is (nothing is switched or restored), every other
  model goes to transformers' own method unchanged. The wrap reads only
  ``model.config._attn_implementation``, as HF's method does; were the method
  renamed, the wrap is skipped and HF's own error comes back. ``paged|NAME``
  then works as ``NAME`` (HF strips the prefix with a deprecation warning).
  An implementation that HF does not know gets neither its 4-D mask nor the
  decode fast path, which is what this path wants.

* causality: a layer whose model is causal (``module.is_causal`` and the config's
  ``is_causal``, HF's own switch to bidirectional masks) takes ``k <= q`` too, so
  a pattern that is not causal never lets a decoder's tokens see later ones.
* packed sequences found from ``position_ids`` (HF's rule, where no attention
  mask and no cache is given: a new sequence wherever a position is not the one
  before plus one; ``DataCollatorWithFlattening``'s default): the mask function
  hands HF's sequence ids to the layer (an int ``[B, 1, 1, keys]``) and each row's
  sequences run as ``cu_seqlens=`` rows of one call, each from position 0.

The mask function reads what HF composed for the layer kind (its ``mask_function``:
causal or bidirectional, the sliding window, padding, packing) and refuses what a
layer would otherwise lose without a word, by name: Llama 4's chunked attention
layers, bidirectional sliding windows, or/and overlays (Gemma 3's image tokens,
block overlays) and any mask function it does not know. GPT-OSS's attention sinks
(``s_aux``) are refused too; ``output_attentions=True`` gets no weights, with a
warning, as HF's sdpa says.

GQA (fewer key/value heads) is passed through natively. HF's ``[B, H, N, D]``
query/key/value come in, ``[B, N, H, D]`` goes out. Dropout is refused while
training with it.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import warnings

import sympy
import torch

from ..core import ir
from ..core import symbols as S
from ..core.errors import SpecError
from ..runtime.api import Attention, compile_attention
from ..spec.library import load

__all__ = ["PAD_INPUT", "layer_pattern", "register"]

# The call-time input that carries HF's padding mask ([B, nk] ints, 0 = padding).
PAD_INPUT = "hf_key_padding"

# Names transformers itself defines: registering over them would silently change
# every model that asks for them.
_RESERVED = (
    "eager",
    "sdpa",
    "flex_attention",
    "flash_attention_2",
    "flash_attention_3",
    "flash_attention_4",
    "paged|eager",
)


def _base_pattern(pattern, params: dict) -> ir.PatternIR:
    if isinstance(pattern, ir.PatternIR | ir.RecurrenceIR | ir.CombinedIR | ir.BucketedIR):
        if params:
            raise SpecError(
                "parameters apply when loading; this pattern is already loaded",
                where="argument pattern",
                hint="pass the source (path, 'stdlib:NAME' or text) instead",
            )
        pat = pattern
    else:
        pat = load(pattern, **params)
    if not isinstance(pat, ir.PatternIR):
        raise SpecError(
            f"'{pat.name}' is {ir.what_it_is(pat)}; HF attention layers take a softmax pattern",
            where="argument pattern",
        )
    if not pat.self_attention or pat.queries.kind != "seq":
        raise SpecError(
            f"pattern '{pat.name}' has layout queries {pat.queries.describe()} / keys "
            f"{pat.keys.describe()}; HF attention layers need `tokens seq`",
            where="argument pattern",
        )
    if pat.inputs:
        names = ", ".join(i.name for i in pat.inputs)
        raise SpecError(
            f"pattern '{pat.name}' takes call-time inputs ({names}) that HF layers cannot pass",
            where="argument pattern",
            hint="use a pattern without `input` declarations",
        )
    return pat


def _model_terms(padded: bool, window: int | None, causal: bool = False) -> ir.PatternIR:
    """The model's own conditions as a checked pattern (the checker builds the IR)."""
    conds, lines = [], ["pattern hf_layer", "  tokens seq"]
    if padded:
        lines.append(f"  input {PAD_INPUT}: int[n]")
        conds.append(f"{PAD_INPUT}[k] != 0")
    if window is not None:
        conds.append(f"q - k < {window}")
    if causal:
        conds.append("k <= q")
    lines.append("  mask " + " and ".join(conds))
    return load("\n".join(lines) + "\n")


def layer_pattern(
    base: ir.PatternIR,
    *,
    padded: bool = False,
    window: int | None = None,
    softcap: float | None = None,
    causal: bool = False,
) -> ir.PatternIR:
    """``base`` with one HF layer's conditions: key padding, sliding window, softcap, and causality (``causal``:
    ``k <= q`` where ``base``'s mask does not already imply it)."""
    if window is not None and (
        isinstance(window, bool) or not isinstance(window, int) or window < 1
    ):
        raise SpecError(
            f"sliding_window must be a positive int, got {window!r}",
            where="argument sliding_window",
        )
    pat = base
    causal = causal and not _implies_causal(base.mask)
    if padded or window is not None or causal:
        extra = _model_terms(padded, window, causal)
        pat = dataclasses.replace(
            pat, mask=S.logic_and(pat.mask, extra.mask), inputs=pat.inputs + extra.inputs
        )
    if softcap is not None:
        if (
            isinstance(softcap, bool)
            or not isinstance(softcap, int | float)
            or not (math.isfinite(softcap) and softcap > 0)
        ):
            raise SpecError(
                f"softcap must be a positive number, got {softcap!r}", where="argument softcap"
            )
        if base.softcap is None:
            pat = dataclasses.replace(pat, softcap=sympy.Float(float(softcap)))
        elif not (
            base.softcap.is_number and math.isclose(float(base.softcap), softcap, rel_tol=1e-12)
        ):
            raise SpecError(
                f"the model softcaps logits at {softcap} but pattern '{base.name}' at {base.softcap}",
                where="argument pattern",
                hint="drop the pattern's softcap clause; the model's applies",
            )
    return pat


def _implies_causal(mask) -> bool:
    """Whether a top-level term of ``mask`` is ``q - k >= c`` with ``c >= 0`` (then ``k <= q`` adds nothing)."""
    if mask is sympy.false:
        return True
    for term in mask.args if isinstance(mask, sympy.And) else (mask,):
        if isinstance(term, sympy.GreaterThan | sympy.StrictGreaterThan):
            e, strict = term.lhs - term.rhs, isinstance(term, sympy.StrictGreaterThan)
        elif isinstance(term, sympy.LessThan | sympy.StrictLessThan):
            e, strict = term.rhs - term.lhs, isinstance(term, sympy.StrictLessThan)
        else:
            continue
        rest = sympy.expand(e - (S.Q - S.K))
        if rest.is_number and (rest <= (1 if strict else 0)):
            return True
    return False


def reads_positions(pat: ir.PatternIR) -> bool:
    """Whether ``pat`` reads where its tokens are, not only how far apart (``q - k``): a term of ``q`` or ``k``
    alone (``k < sinks``), a size (``n``, ``nk``), a window clamped at the sequence's ends, or a route's blocks.
    Such a pattern sees a left-padded row's tokens at other positions than the row alone (``_left_padded``).
    A relational is compared by ``lhs - rhs``, so ``k <= q`` under a shift of both is ``k <= q`` again."""
    if pat.route is not None:
        return True
    shift = sympy.Dummy("shift", integer=True)
    for expr in (pat.mask, pat.bias, pat.softcap):
        if expr is None or not isinstance(expr, sympy.Basic):
            continue
        if expr.free_symbols & {S.N, S.NK, S.NQ}:
            return True
        flat = expr.replace(lambda e: isinstance(e, sympy.core.relational.Relational),
                            lambda e: e.func(e.lhs - e.rhs, 0))
        if flat.xreplace({S.Q: S.Q + shift, S.K: S.K + shift}) != flat:
            return True
    return False


def _bucket(n: int) -> int:
    """``n`` rounded up to a power of two (at least 16): the bounds a plan of a paged call is kept for."""
    return max(16, 1 << (n - 1).bit_length())


def _left_padded(attn: Attention, query, key, value, pad: torch.Tensor, scaling) -> torch.Tensor | None:
    """A batch of a pattern that reads positions (``reads_positions``) with rows that start with padding
    (HF's left padding): each such row run alone on its keys after its leading pads, its queries at those keys'
    positions (a query on a pad comes out as zeros, as a row of padded keys does), so that its tokens sit where
    they would without the padding; None where no row starts with padding (the batch runs as one call). One host
    read of the padding, and a call per padded row: the price of positions that padding would move."""
    lead = (pad != 0).to(torch.int64).argmax(-1).masked_fill(~(pad != 0).any(-1), pad.shape[1])
    leads = lead.tolist()
    if not any(leads):
        return None
    n, nk = query.shape[2], key.shape[2]
    out = query.new_zeros(*query.shape[:3], value.shape[-1])
    whole = [b for b, first_key in enumerate(leads) if first_key == 0]  # rows with no leading pad: one call
    if whole:
        rows = torch.tensor(whole, device=query.device)
        out[rows] = attn(query[rows], key[rows], value[rows], scale=scaling, **{PAD_INPUT: pad[rows]})
    for b, first_key in enumerate(leads):
        first_query = max(0, first_key - (nk - n))  # the queries are the last n of the row's keys
        if first_key == 0 or first_query >= n:
            continue
        row = attn(query[b:b + 1, :, first_query:], key[b:b + 1, :, first_key:], value[b:b + 1, :, first_key:],
                   scale=scaling, **{PAD_INPUT: pad[b:b + 1, first_key:]})
        out[b:b + 1, :, first_query:] = row
    return out


class _Implementation:
    """One registered name: the pattern and its compiled modules per layer kind."""

    def __init__(self, name: str, base: ir.PatternIR, backend: str) -> None:
        self.name = name
        self.base = base
        self.backend = backend
        # (padded, window, softcap, causal) -> module; a model has a handful of layer kinds.
        self.modules: dict[tuple, Attention] = {}
        self.reads_positions = reads_positions(base)  # left padding moves its tokens: rows run alone
        self.warned: set[str] = set()

    def module(self, padded: bool, window: int | None, softcap: float | None, causal: bool = False) -> Attention:
        key = (padded, window, softcap, causal)
        if key not in self.modules:
            pat = layer_pattern(self.base, padded=padded, window=window, softcap=softcap, causal=causal)
            self.modules[key] = compile_attention(pat, backend=self.backend)
        return self.modules[key]

    def _refuse_or_warn(self, kwargs: dict) -> None:
        """What HF hands a layer that attnc does not compute: GPT-OSS's sinks refused, attention weights warned of
        (once), as HF's sdpa does."""
        if kwargs.get("s_aux") is not None:
            raise SpecError(
                f"attn_implementation={self.name!r} has no attention sinks (this model's s_aux: a learned logit per "
                "head in every softmax's denominator); its answers would differ from the model's",
                where="argument s_aux",
                hint="run this model with attn_implementation='eager'",
            )
        if kwargs.get("output_attentions") and "output_attentions" not in self.warned:
            self.warned.add("output_attentions")  # once per name, as transformers' own warning
            warnings.warn(f"attn_implementation={self.name!r} does not return attention weights "
                          "(output_attentions=True): the layers' weights come back as None, as with transformers' sdpa",
                          stacklevel=2)

    def attention(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float | None = None,
        dropout: float = 0.0,
        sliding_window: int | None = None,
        softcap: float | None = None,
        **kwargs,
    ):
        """HF's attention-function signature: [B, H, N, D] in, ([B, N, H, D], None) out. With
        ``cu_seq_lens_q`` / ``cu_seq_lens_k`` (continuous batching, padding-free packing) q, k, v
        are packed batches of one and each row is computed alone (``_packed``)."""
        if dropout and getattr(module, "training", False):
            raise SpecError(
                f"attn_implementation={self.name!r} has no attention dropout (got {dropout})",
                where="argument dropout",
                hint="set the config's attention_dropout to 0",
            )
        refusal = getattr(attention_mask, "attnc_refusal", None)
        if refusal is not None:  # the mask function found a part of this layer's mask attnc does not apply
            raise refusal
        self._refuse_or_warn(kwargs)
        causal = bool(getattr(module, "is_causal", False)) and getattr(getattr(module, "config", None), "is_causal",
                                                                       True) is not False
        cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
        if cu_q is not None or cu_k is not None:  # continuous batching or padding-free packing
            if attention_mask is not None:
                raise SpecError(
                    f"attn_implementation={self.name!r} takes a packed batch's rows from "
                    "cu_seq_lens_q / cu_seq_lens_k, without an attention mask",
                    where="argument attention_mask",
                    hint="express any further condition in the pattern",
                )
            attn = self.module(False, sliding_window, None if softcap is None else float(softcap), causal)
            one = self._one_paged_call(attn, query, key, value, cu_q, cu_k, scaling, kwargs.get("max_length_q"),
                                       kwargs.get("max_length_k"))
            if one is not None:
                return one, None
            return self._packed(attn, query, key, value, cu_q, cu_k, scaling), None
        if _is_sequence_ids(attention_mask):  # packed sequences found from position_ids (``_padding_mask``)
            attn = self.module(False, sliding_window, None if softcap is None else float(softcap), causal)
            return _packed_rows(attn, query, key, value, attention_mask, scaling), None
        inputs = {}
        if attention_mask is not None:
            pad = self._key_padding(attention_mask, query, key)
            if pad.shape[1] < key.shape[2]:  # a static cache: its filled keys, the queries last
                key, value = key[:, :, : pad.shape[1]], value[:, :, : pad.shape[1]]
            inputs[PAD_INPUT] = pad.to(torch.int64)
        attn = self.module(
            attention_mask is not None, sliding_window, None if softcap is None else float(softcap), causal
        )
        if attention_mask is not None and self.reads_positions:
            out = _left_padded(attn, query, key, value, inputs[PAD_INPUT], scaling)
            if out is not None:
                return out.transpose(1, 2).contiguous(), None
        out = attn(query, key, value, scale=scaling, **inputs)
        return out.transpose(1, 2).contiguous(), None

    def _one_paged_call(self, attn: Attention, query, key, value, cu_q, cu_k, scaling, max_q, max_k):
        """HF's packed batch as one paged call of one launch, where the module's runner reads pages in its kernel
        (``pages_in_one_launch``), no gradient is asked and HF gives ``max_length_q`` / ``max_length_k`` as ints:
        the packed keys read as one-key pages (row r's key j is page ``cu_k[r] + j``), each row's queries by
        ``cu_seqlens_q``; the table, lengths and offsets made on the device, nothing read on the host. The table's
        width and the query bound are rounded up (``_bucket``), so that the module's plan for them serves many
        steps. None where it does not apply (``_packed`` serves the call)."""
        serves = getattr(attn.runner, "pages_in_one_launch", None)
        ints = all(isinstance(x, int) and not isinstance(x, bool) and x > 0 for x in (max_q, max_k))
        tensors = all(isinstance(c, torch.Tensor) and c.dim() == 1 and c.numel() >= 2 for c in (cu_q, cu_k))
        if serves is None or not ints or not tensors or query.shape[0] != 1 or key.shape[0] != 1:
            return None
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            return None
        k_pool, v_pool = (x[0].transpose(0, 1).unsqueeze(1) for x in (key, value))  # [total_k, 1, Hkv, D] views
        if not serves(query, k_pool, v_pool):
            return None
        cu_k = cu_k.to(torch.int32)
        width = _bucket(max_k)
        table = cu_k[:-1].view(-1, 1) + torch.arange(width, device=cu_k.device, dtype=torch.int32)
        out = attn(query, k_pool, v_pool, block_table=table, cache_seqlens=cu_k[1:] - cu_k[:-1],
                   cu_seqlens_q=cu_q.to(torch.int32), max_seqlen_q=min(_bucket(max_q), query.shape[2]),
                   scale=scaling, layout="bhnd")
        return out.transpose(1, 2).contiguous()

    def _packed(self, attn: Attention, query, key, value, cu_q, cu_k, scaling) -> torch.Tensor:
        """HF's packed batch (``[1, H, total, D]``; row r's queries ``cu_q[r]:cu_q[r + 1]``, the last
        of its keys ``cu_k[r]:cu_k[r + 1]``) through attnc: one ``cu_seqlens=`` call when every row
        has as many queries as keys, else one paged call per distinct query count, the packed keys
        read as one-key pages. Returns ``[1, total_q, H, Dv]``."""
        where = "argument cu_seq_lens_q"
        for name, cu in (("cu_seq_lens_q", cu_q), ("cu_seq_lens_k", cu_k)):
            if not (isinstance(cu, torch.Tensor) and cu.dim() == 1 and cu.numel() >= 1):
                got = list(cu.shape) if isinstance(cu, torch.Tensor) else type(cu).__name__
                raise SpecError(
                    f"attn_implementation={self.name!r} takes {name} as a 1-D tensor of cumulative "
                    f"counts, got {got}",
                    where=f"argument {name}",
                    hint="HF's paged cache selects the layer's counts in cache.update",
                )
        if query.shape[0] != 1 or key.shape[0] != 1:
            raise SpecError(
                f"a packed batch comes as a batch of 1, got q {list(query.shape)}, k {list(key.shape)}",
                where=where,
            )
        q_off, k_off = cu_q.tolist(), cu_k.tolist()  # one host read each, every check below on them
        total_q, total_k = query.shape[2], key.shape[2]
        rows = len(q_off) - 1
        if len(k_off) != len(q_off):
            raise SpecError(
                f"{rows} rows of queries but {len(k_off) - 1} of keys",
                where="argument cu_seq_lens_k",
            )
        nq = [b - a for a, b in itertools.pairwise(q_off)]
        nk = [b - a for a, b in itertools.pairwise(k_off)]
        for r in range(rows):
            if nq[r] < 0 or nk[r] < nq[r]:
                raise SpecError(
                    f"row {r} has {nq[r]} queries and {nk[r]} keys; the queries are the row's last "
                    "keys, so 0 <= queries <= keys",
                    where=where,
                )
        if q_off[0] != 0 or k_off[0] != 0 or q_off[-1] > total_q or k_off[-1] > total_k:
            raise SpecError(
                f"offsets [{q_off[0]} .. {q_off[-1]}] of queries and [{k_off[0]} .. {k_off[-1]}] of keys "
                f"outside the packed {total_q} queries and {total_k} keys (they start at 0)",
                where=where,
            )
        if q_off == k_off and q_off[-1] == total_q == total_k:  # as many queries as keys per row
            out = attn(query, key, value, scale=scaling, cu_seqlens=cu_q)
            return out.transpose(1, 2).contiguous()
        # The packed keys as a pool of one-key pages: row r's key j is page k_off[r] + j.
        k_pool, v_pool = (x[0].transpose(0, 1).unsqueeze(1) for x in (key, value))
        out = query.new_zeros(1, query.shape[1], total_q, value.shape[3])
        groups: dict[int, list[int]] = {}
        for r in range(rows):
            if nq[r]:
                groups.setdefault(nq[r], []).append(r)
        device = query.device
        for n, members in sorted(groups.items()):
            count, steps = len(members), torch.arange(n, device=device)
            starts = torch.tensor([q_off[r] for r in members], device=device)
            index = (starts[:, None] + steps).flatten()
            gq = query[0].index_select(1, index).unflatten(1, (count, n)).transpose(0, 1)
            longest = max(nk[r] for r in members)
            first = torch.tensor([k_off[r] for r in members], device=device, dtype=torch.int32)
            table = first[:, None] + torch.arange(longest, device=device, dtype=torch.int32)
            seqlens = torch.tensor([nk[r] for r in members], device=device, dtype=torch.int32)
            res = attn(
                gq,
                k_pool,
                v_pool,
                block_table=table,
                cache_seqlens=seqlens,
                scale=scaling,
                layout="bhnd",
            )
            out[0].index_copy_(1, index, res.transpose(0, 1).flatten(1, 2))
        return out.transpose(1, 2).contiguous()

    def _key_padding(self, mask, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        """The keys' padding ``[B, keys]`` from the mask function's ``[B, 1, 1, keys]`` (``keys`` up to
        the buffer's length, at least the queries') or a 2-D ``[B, keys]`` mask; anything else refused."""
        batch, buffer, n = key.shape[0], key.shape[2], query.shape[2]
        shape = tuple(getattr(mask, "shape", ()))
        four_d = len(shape) == 4 and shape[:3] == (batch, 1, 1) and n <= shape[3] <= buffer
        if isinstance(mask, torch.Tensor) and four_d and mask.dtype == torch.bool:
            return mask[:, 0, 0]
        if isinstance(mask, torch.Tensor) and shape == (batch, buffer):
            return mask
        got = list(shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise SpecError(
            f"attn_implementation={self.name!r} takes the keys' padding, bool [batch, 1, 1, keys] "
            f"(from its mask function) or [batch, keys] = [{batch}, {buffer}], got {got}"
            + (f" {mask.dtype}" if isinstance(mask, torch.Tensor) else ""),
            where="argument attention_mask",
            hint="custom 4-D masks are not translated; express them in the pattern",
        )


def _is_sequence_ids(mask) -> bool:
    """Whether a layer's ``attention_mask`` is HF's packed sequence ids (``_padding_mask``): int ``[B, 1, 1, n]``."""
    return (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[1:3] == (1, 1)
            and not mask.dtype.is_floating_point and mask.dtype != torch.bool)


def _packed_rows(attn: Attention, query, key, value, ids: torch.Tensor, scaling) -> torch.Tensor:
    """A batch whose rows pack several sequences (``ids`` ``[B, 1, 1, n]``, HF's sequence index of each token): every
    row's sequences as ``cu_seqlens=`` rows of one call on the flattened batch, each sequence alone from position 0
    (HF remaps positions to the sequence's too). One host read of the sequences' starts. ``[B, n, H, Dv]``."""
    B, H, n, _ = query.shape
    if key.shape[2] != n or ids.shape[0] != B or ids.shape[3] != n:
        raise SpecError(f"packed sequence ids {list(ids.shape)} for q {list(query.shape)}, k {list(key.shape)}: "
                        "packing applies without a cache, as many keys as queries", where="argument position_ids")
    seq = ids[:, 0, 0].to(torch.int64)
    starts = torch.ones_like(seq, dtype=torch.bool)
    starts[:, 1:] = seq[:, 1:] != seq[:, :-1]
    cu = torch.cat([starts.flatten().nonzero().flatten(), torch.tensor([B * n], device=seq.device)])
    flat = [x.transpose(0, 1).reshape(x.shape[1], B * n, x.shape[3])[None] for x in (query, key, value)]
    out = attn(*flat, scale=scaling, cu_seqlens=cu.to(torch.int32))  # [1, H, B * n, Dv]
    return out[0].view(H, B, n, -1).permute(1, 2, 0, 3).contiguous()


#: HF's mask functions (transformers.masking_utils) by the name of their factory: what each imposes on a layer
_MASK_FUNCTIONS = {
    "causal_mask_function": "causal", "bidirectional_mask_function": "bidirectional",
    "sliding_window_overlay": "window", "padding_mask_function": "padding",
    "packed_sequence_mask_function": "packed", "remap_positions_for_packed_sequence": "packed positions",
    "add_offsets_to_mask_function": "offsets", "and_masks": "and", "or_masks": "or",
    "chunked_overlay": "chunked", "sliding_window_bidirectional_overlay": "bidirectional window",
    "blockwise_overlay": "blockwise overlay",
}
#: what a layer computes besides the pattern (the attention function's padding, window, causality, packing)
_APPLIED = {"causal", "bidirectional", "window", "padding", "packed", "packed positions", "offsets", "and"}
#: Pairs evaluated at once where an overlay's every pair is checked (``_adds_every_pair``).
_OVERLAY_CHUNK = 1 << 22


def _kind(fn) -> str | None:
    """The kind of one of HF's mask functions (``_MASK_FUNCTIONS``), None for one it does not define."""
    return _MASK_FUNCTIONS.get(getattr(fn, "__qualname__", type(fn).__name__).split(".<locals>")[0])


def _parts(fn) -> list:
    """The mask functions a composed one holds in its closure (``and_masks``' and ``or_masks``' operands, the function a
    wrapper remaps or offsets), and its tensors."""
    out = []
    for cell in getattr(fn, "__closure__", None) or ():
        try:
            value = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        out.extend(value if isinstance(value, tuple) else (value,))
    return out


def _adds_every_pair(fn, where: tuple) -> bool:
    """Whether the overlay ``fn`` allows every (query, key) pair of the layer (``where``: batch, and the queries' and
    keys' absolute ranges): Gemma 3's bidirectional layers OR causality with ``lambda *a: True``. Evaluated on the
    pairs, a block of queries at a time; a function that does not take index tensors does not qualify."""
    batch, (q0, q1), (k0, k1) = where
    b, h, kv = torch.arange(batch).view(-1, 1, 1), torch.zeros((), dtype=torch.long), torch.arange(k0, k1).view(1, 1, -1)
    step = max(1, _OVERLAY_CHUNK // max(1, batch * (k1 - k0)))
    try:
        for start in range(q0, q1, step):
            q = torch.arange(start, min(q1, start + step)).view(1, -1, 1)
            if not bool(torch.as_tensor(fn(b, h, q, kv)).all()):
                return False
    except Exception:  # noqa: BLE001 (a model's own function, not written for index tensors)
        return False
    return True


def _refuse_mask_part(what: str) -> SpecError:
    return SpecError(
        f"this layer's mask has a part attnc does not apply ({what}): its answers would differ from the model's",
        where="argument mask_function",
        hint="chunked attention (Llama 4), bidirectional windows, or/and overlays (image tokens, blocks) and models' "
             "own mask functions run with attn_implementation='sdpa' or 'eager'")


def _read_mask_function(fn, where: tuple) -> torch.Tensor | None:
    """What HF composed for a layer kind (``fn``), checked: the packed sequence ids ``[B, n]`` where it packs, else
    None. A part attnc does not apply is refused by name (it would be lost without a word), except an overlay OR-ed
    in that adds no pair (a blockwise overlay with no block: a multimodal model's text-only input) or every pair (the
    layer is then bidirectional, as its ``is_causal`` says to the attention function)."""
    if fn is None:
        return None
    kind = _kind(fn)
    if kind == "or":
        ids = None
        for part in _parts(fn):
            if not callable(part) or isinstance(part, torch.Tensor | type):
                continue
            if _kind(part) == "blockwise overlay":
                blocks = next((t for t in _parts(part) if isinstance(t, torch.Tensor)), None)
                if blocks is not None and bool((blocks >= 0).any()):
                    raise _refuse_mask_part("blockwise overlay")
            elif _kind(part) in ("causal", "bidirectional", "and", "packed positions", "offsets"):
                ids = _read_mask_function(part, where) if ids is None else ids
            elif not _adds_every_pair(part, where):
                raise _refuse_mask_part(_kind(part) or getattr(part, "__qualname__", repr(part)))
        return ids
    if kind not in _APPLIED:
        raise _refuse_mask_part(kind or getattr(fn, "__qualname__", repr(fn)))
    if kind == "packed":
        return next(t for t in _parts(fn) if isinstance(t, torch.Tensor))
    ids = None
    for part in _parts(fn):
        if callable(part) and not isinstance(part, torch.Tensor | type):
            found = _read_mask_function(part, where)
            ids = found if found is not None else ids
    return ids


def _padding_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function=None,
    attention_mask: torch.Tensor | None = None,
    **kwargs,
) -> torch.Tensor | None:
    """The mask function HF calls for our names: the padding of the keys the layer holds,
    ``[B, 1, 1, keys]`` bool, or None (no padding and no static buffer)."""
    # attnc puts the queries at the end of the keys. Dynamic caches (full and sliding) do
    # too; a static cache hands over its whole buffer of kv_length slots with the queries
    # inside: its filled keys end where the queries do.
    try:
        packed = _read_mask_function(mask_function, (batch_size, (int(q_offset), int(q_offset) + q_length),
                                                     (int(kv_offset), int(kv_offset) + kv_length)))
    except SpecError as err:  # raised by the layers that take this mask, not here: a model may make masks of a kind
        refused = torch.zeros(0, dtype=torch.bool)  # none of its layers has (Gemma 3's sliding one, all full)
        refused.attnc_refusal = err
        return refused
    if packed is not None:  # HF found packed sequences (no mask, no cache): their ids go to the layers
        return packed.to(torch.int64).expand(batch_size, -1)[:, None, None, :]
    q_end, kv_end = int(q_offset) + q_length, int(kv_offset) + kv_length
    keys = q_end - int(kv_offset)
    if not q_length <= keys <= kv_length:
        raise SpecError(
            f"the queries end at position {q_end}, outside the layer's keys "
            f"[{kv_offset}, {kv_end}); attnc takes the queries as the last keys",
            where="argument past_key_values",
            hint="use a DynamicCache or a StaticCache",
        )
    pad = None
    if attention_mask is not None:
        # HF's 2-D mask covers every token seen; the layer holds the keys from kv_offset (a
        # sliding layer's cache keeps only its last keys). Positions past the mask are padding,
        # as in HF's own mask functions.
        pad = attention_mask.to(torch.bool)
        missing = q_end - pad.shape[-1]
        if missing > 0:
            pad = torch.nn.functional.pad(pad, (0, missing))
        pad = pad[:, int(kv_offset) : q_end]
        if bool(pad.all()):
            pad = None
    if pad is None and keys == kv_length:
        return None
    if pad is None:  # a static buffer without padding: the mask carries how many keys are filled
        device = kwargs.get("device", attention_mask.device if attention_mask is not None else None)
        pad = torch.ones(batch_size, keys, dtype=torch.bool, device=device)
    return pad[:, None, None, :]


# Names registered here: continuous batching admits the models that use them as they are.
_NAMES: set[str] = set()


def _admit_to_continuous_batching() -> None:
    """Wrap ``ContinuousBatchingManager.switch_to_cb_friendly_attn`` (transformers 5.24) once so
    that a model running a name registered here enters continuous batching unchanged; HF's own
    method decides for every other model (see the module docstring)."""
    try:
        from transformers.generation.continuous_batching.continuous_api import (
            ContinuousBatchingManager,
        )
    except ImportError:  # a transformers without continuous batching
        return
    original = getattr(ContinuousBatchingManager, "switch_to_cb_friendly_attn", None)
    if original is None or getattr(original, "attnc_admits", False):
        return

    @functools.wraps(original)
    def switch_to_cb_friendly_attn(self, model, *args, **kwargs):
        if getattr(model.config, "_attn_implementation", None) in _NAMES:
            return None  # an attnc name serves the packed batch itself: nothing to switch
        return original(self, model, *args, **kwargs)

    switch_to_cb_friendly_attn.attnc_admits = True
    ContinuousBatchingManager.switch_to_cb_friendly_attn = switch_to_cb_friendly_attn


def register(name: str, pattern, *, backend: str = "auto", **params) -> str:
    """Register ``pattern`` as ``attn_implementation=name`` in transformers.

    ``pattern``: a loaded softmax pattern on ``tokens seq`` without call-time
    inputs, a path, ``"stdlib:NAME"`` or spec text (keywords set its parameters).
    ``backend``: as in ``compile_attention``. Registers the attention function in
    ``AttentionInterface`` and the padding-mask function in
    ``AttentionMaskInterface`` (both are needed for padding to reach the layers),
    and admits the name to HF's continuous batching (``generate_batch``).
    Returns ``name``. See the module docstring for what each layer computes.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not isinstance(name, str) or not name or name in _RESERVED:
        raise SpecError(
            f"name must be a new attention implementation name, got {name!r}",
            where="argument name",
            hint="transformers' own names (" + ", ".join(_RESERVED) + ") are not replaced",
        )
    impl = _Implementation(name, _base_pattern(pattern, params), backend)
    # a bad backend is refused now, not in the first forward
    compile_attention(impl.base, backend=backend)
    AttentionInterface.register(name, impl.attention)
    AttentionMaskInterface.register(name, _padding_mask)
    _NAMES.add(name)
    _admit_to_continuous_batching()
    return name
