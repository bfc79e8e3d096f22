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
  skips mask creation for names it does not know there) and becomes a per-batch
  key input (``hf_key_padding[k] != 0``). A query row whose keys are all padding
  (a left-padded position) comes out as zeros, never NaN; HF never reads it.
* the layer's sliding window (``sliding_window=`` from Mistral or Gemma 2's
  sliding layers): ``q - k < sliding_window``, HF's own rule;
* the layer's logit softcap (Gemma 2's ``attn_logit_softcapping``) and scaling
  (``query_pre_attn_scalar``). A pattern with its own softcap must agree.
* the KV cache: with ``nk > n`` keys the queries are the last ``n`` positions
  (attnc's decoding rule), which is where HF's cache puts them. HF's sliding
  layers keep only their last ``sliding_window - 1`` keys; positions there are
  relative to the kept keys, which changes nothing for a pattern that depends on
  ``q - k`` only (causal, windows, dilation) but moves absolute positions
  (``k < sinks``): use such a pattern on full-attention layers. Static caches
  (queries inside a preallocated buffer) are refused.

GQA (fewer key/value heads) is passed through natively. HF's ``[B, H, N, D]``
query/key/value come in, ``[B, N, H, D]`` goes out. Not applied: HF's
or/and mask overlays and its packed-sequence detection from ``position_ids``
(the pattern is the mask there), dropout (refused while training with it).
"""

from __future__ import annotations

import dataclasses
import math

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
_RESERVED = ("eager", "sdpa", "flex_attention", "flash_attention_2", "flash_attention_3", "flash_attention_4",
             "paged|eager")


def _base_pattern(pattern, params: dict) -> ir.PatternIR:
    if isinstance(pattern, ir.PatternIR | ir.RecurrenceIR):
        if params:
            raise SpecError("parameters apply when loading; this pattern is already loaded", where="argument pattern",
                            hint="pass the source (path, 'stdlib:NAME' or text) instead")
        pat = pattern
    else:
        pat = load(pattern, **params)
    if not isinstance(pat, ir.PatternIR):
        raise SpecError(f"'{pat.name}' is a recurrence; HF attention layers take a softmax pattern",
                        where="argument pattern")
    if not pat.self_attention or pat.queries.kind != "seq":
        raise SpecError(f"pattern '{pat.name}' has layout queries {pat.queries.describe()} / keys "
                        f"{pat.keys.describe()}; HF attention layers need `tokens seq`", where="argument pattern")
    if pat.inputs:
        names = ", ".join(i.name for i in pat.inputs)
        raise SpecError(f"pattern '{pat.name}' takes call-time inputs ({names}) that HF layers cannot pass",
                        where="argument pattern", hint="use a pattern without `input` declarations")
    return pat


def _model_terms(padded: bool, window: int | None) -> ir.PatternIR:
    """The model's own conditions as a checked pattern (the checker builds the IR)."""
    conds, lines = [], ["pattern hf_layer", "  tokens seq"]
    if padded:
        lines.append(f"  input {PAD_INPUT}: int[n]")
        conds.append(f"{PAD_INPUT}[k] != 0")
    if window is not None:
        conds.append(f"q - k < {window}")
    lines.append("  mask " + " and ".join(conds))
    return load("\n".join(lines) + "\n")


def layer_pattern(base: ir.PatternIR, *, padded: bool = False, window: int | None = None,
                  softcap: float | None = None) -> ir.PatternIR:
    """``base`` with one HF layer's conditions: key padding, sliding window, softcap."""
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise SpecError(f"sliding_window must be a positive int, got {window!r}", where="argument sliding_window")
    pat = base
    if padded or window is not None:
        extra = _model_terms(padded, window)
        pat = dataclasses.replace(pat, mask=S.logic_and(pat.mask, extra.mask), inputs=pat.inputs + extra.inputs)
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, int | float) or not (
            math.isfinite(softcap) and softcap > 0
        ):
            raise SpecError(f"softcap must be a positive number, got {softcap!r}", where="argument softcap")
        if base.softcap is None:
            pat = dataclasses.replace(pat, softcap=sympy.Float(float(softcap)))
        elif not (base.softcap.is_number and math.isclose(float(base.softcap), softcap, rel_tol=1e-12)):
            raise SpecError(f"the model softcaps logits at {softcap} but pattern '{base.name}' at {base.softcap}",
                            where="argument pattern", hint="drop the pattern's softcap clause; the model's applies")
    return pat


class _Implementation:
    """One registered name: the pattern and its compiled modules per layer kind."""

    def __init__(self, name: str, base: ir.PatternIR, backend: str) -> None:
        self.name = name
        self.base = base
        self.backend = backend
        # (padded, window, softcap) -> module; a model has a handful of layer kinds.
        self.modules: dict[tuple, Attention] = {}

    def module(self, padded: bool, window: int | None, softcap: float | None) -> Attention:
        key = (padded, window, softcap)
        if key not in self.modules:
            pat = layer_pattern(self.base, padded=padded, window=window, softcap=softcap)
            self.modules[key] = compile_attention(pat, backend=self.backend)
        return self.modules[key]

    def attention(self, module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, scaling: float | None = None, dropout: float = 0.0,
                  sliding_window: int | None = None, softcap: float | None = None, **kwargs):
        """HF's attention-function signature: [B, H, N, D] in, ([B, N, H, D], None) out."""
        if dropout and getattr(module, "training", False):
            raise SpecError(f"attn_implementation={self.name!r} has no attention dropout (got {dropout})",
                            where="argument dropout", hint="set the config's attention_dropout to 0")
        padded = attention_mask is not None
        inputs = {}
        if padded:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (key.shape[0], key.shape[2]):
                shape = getattr(attention_mask, "shape", type(attention_mask).__name__)
                raise SpecError(f"attn_implementation={self.name!r} takes a 2-D padding mask [batch, keys] = "
                                f"[{key.shape[0]}, {key.shape[2]}], got {shape}", where="argument attention_mask",
                                hint="custom 4-D masks are not translated; express them in the pattern")
            inputs[PAD_INPUT] = attention_mask.to(torch.int64)
        attn = self.module(padded, sliding_window, None if softcap is None else float(softcap))
        out = attn(query, key, value, scale=scaling, **inputs)
        return out.transpose(1, 2).contiguous(), None


def _padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=None, attention_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor | None:
    """The mask function HF calls for our names: the keys' padding, [B, kv_length] bool, or None."""
    # attnc puts the queries at the end of the keys. Dynamic caches (full and sliding) do
    # too; a static cache hands over its whole buffer with the queries somewhere inside.
    q_end, kv_end = int(q_offset) + q_length, int(kv_offset) + kv_length
    if q_end != kv_end:
        raise SpecError(f"the queries end at position {q_end} but the keys at {kv_end} (a static or "
                        "preallocated KV cache); attnc takes the queries as the last keys",
                        where="argument past_key_values", hint="use the default DynamicCache")
    if attention_mask is None:
        return None
    # HF's 2-D mask covers every token seen; the layer sees kv_length keys from kv_offset
    # (a sliding layer's cache keeps only its last keys). Slots past the mask (a static
    # cache's empty tail) are padding, as in HF's own mask functions.
    pad = attention_mask.to(torch.bool)
    missing = kv_offset + kv_length - pad.shape[-1]
    if missing > 0:
        pad = torch.nn.functional.pad(pad, (0, missing))
    pad = pad[:, kv_offset : kv_offset + kv_length]
    return None if bool(pad.all()) else pad


def register(name: str, pattern, *, backend: str = "auto", **params) -> str:
    """Register ``pattern`` as ``attn_implementation=name`` in transformers.

    ``pattern``: a loaded softmax pattern on ``tokens seq`` without call-time
    inputs, a path, ``"stdlib:NAME"`` or spec text (keywords set its parameters).
    ``backend``: as in ``compile_attention``. Registers the attention function in
    ``AttentionInterface`` and the padding-mask function in
    ``AttentionMaskInterface`` (both are needed for padding to reach the layers).
    Returns ``name``. See the module docstring for what each layer computes.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    if not isinstance(name, str) or not name or name in _RESERVED:
        raise SpecError(f"name must be a new attention implementation name, got {name!r}", where="argument name",
                        hint="transformers' own names (" + ", ".join(_RESERVED) + ") are not replaced")
    impl = _Implementation(name, _base_pattern(pattern, params), backend)
    compile_attention(impl.base, backend=backend)  # a bad backend is refused now, not in the first forward
    AttentionInterface.register(name, impl.attention)
    AttentionMaskInterface.register(name, _padding_mask)
    return name
