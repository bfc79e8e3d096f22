"""The keywords of a call of a compiled attention, and the hint for one that is none of them: a misspelt keyword,
another library's keyword (flash-attn's, FlexAttention's, fla's, SDPA's, HF's), or an input the pattern does not
declare (``bind_inputs`` raises the error; this module words its hint)."""

from __future__ import annotations

from ...core.errors import did_you_mean

#: The keyword arguments of a call of a compiled attention besides its inputs
#: (``Attention.forward``, whose ``**inputs`` take any other name): a misspelt one arrives here as
#: an unknown input.
CALL_KEYWORDS = ("scale", "return_lse", "initial_state", "return_state", "sizes", "layout",
                 "cu_seqlens", "block_table", "cache_seqlens", "selection", "return_selection", "return_block_max",
                 "key_summary")


#: Keywords a paged call takes beside block_table= and cache_seqlens= (flash-attn's varlen convention), and what
#: they are otherwise.
PAGED_KEYWORDS = {
    "cu_seqlens_q": "each row's queries, int32 [B + 1] offsets into a packed q (docs/inference.md); without a paged "
                    "cache, " + "cu_seqlens= (one set of offsets for q, k and v; each sequence is computed alone)",
    "max_seqlen_q": "the most queries of a row, with cu_seqlens_q=",
}

#: Keywords of ``compile_attention`` that a call does not take.
COMPILE_KEYWORDS = ("q_tile", "kv_tile", "backend", "name")

_CAUSAL = "causality is part of the pattern ('mask causal ...' in the .attn; a stdlib pattern's is_causal= set " \
          "at compile_attention where it has one)"
_MASK = ("attnc builds its masks from the pattern: write the mask in the .attn ('mask ...'), or declare an input "
         "('input NAME: ...') and pass it by its name; materialize_mask(pattern, ...) shows the mask")
_WINDOW = "a window is part of the pattern: stdlib:sliding_window (window=) or 'mask causal and q - k < W'"
_NO_DROPOUT = "attnc has no attention dropout: apply dropout to the output"
_VARLEN_OFFSETS = "cu_seqlens= (one set of offsets for q, k and v; each sequence is computed alone)"

#: Keywords of other attention APIs (flash-linear-attention, FlexAttention, torch's SDPA, flash-attn,
#: HuggingFace's attention interface) -> how attnc does the same: the hint of a call that passes one,
#: which otherwise names the nearest attnc keyword (``block_mask``: 'block_table'), usually not the fix.
FOREIGN_KEYWORDS = {
    # flash-linear-attention
    "output_final_state": "return_state=True returns (out, final_state)",
    "head_first": "head_first=False ([B, T, H, K] tensors) is layout='bnhd'; head_first=True is attnc's default "
                  "layout='bhnd' ([B, H, T, K])",
    "use_qk_l2norm_in_kernel": "compile with qk_l2norm=True (a parameter of the delta-rule patterns: delta_net, "
                               "gated_delta_net, kda)",
    "offsets": _VARLEN_OFFSETS,
    # FlexAttention
    "block_mask": _MASK,
    "mask_mod": _MASK,
    "score_mod": "score terms are part of the pattern: 'bias ...', 'softcap ...', 'decay ...' in the .attn; "
                 "a float input the bias reads is passed by its name",
    "kernel_options": "tiles are set at compile_attention (q_tile=, kv_tile=) and the kernels by backend=",
    "return_aux": "return_lse=True returns (out, lse)",
    # torch.nn.functional.scaled_dot_product_attention
    "attn_mask": _MASK,
    "is_causal": _CAUSAL,
    "enable_gqa": "GQA is automatic: pass k and v with fewer heads than q (a divisor of q's heads)",
    "dropout_p": _NO_DROPOUT,
    # flash-attn
    "softmax_scale": "scale= (default 1/sqrt(head dim))",
    "causal": _CAUSAL,
    "window_size": _WINDOW,
    "alibi_slopes": "ALiBi is a pattern: stdlib:alibi, or a 'bias' clause in the .attn",
    "softcap": "soft-capping is part of the pattern: stdlib:softcap (cap=), or a 'softcap' clause in the .attn",
    "return_softmax_lse": "return_lse=True returns (out, lse)",
    "return_attn_probs": "return_lse=True returns (out, lse); materialize_mask gives the mask",
    "cu_seqlens_q": _VARLEN_OFFSETS,
    "cu_seqlens_k": _VARLEN_OFFSETS,
    "max_seqlen_q": "not needed: attnc reads the lengths from cu_seqlens=",
    "max_seqlen_k": "not needed: attnc reads the lengths from cu_seqlens=",
    "page_table": "block_table= (with cache_seqlens=)",
    "seqused_k": "cache_seqlens= (with block_table= for paged caches)",
    "rotary_cos": "apply rotary embeddings to q and k before the call",
    "rotary_sin": "apply rotary embeddings to q and k before the call",
    # HuggingFace's attention interface
    "attention_mask": _MASK,
    "scaling": "scale= (default 1/sqrt(head dim))",
    "dropout": _NO_DROPOUT,
    "sliding_window": _WINDOW,
}


def unknown_input_hint(name: str, declared, params=()) -> str:
    """The hint for a keyword that is no declared input: a parameter of that name (set when compiling), the
    attnc way of another API's keyword (``FOREIGN_KEYWORDS``), the closest input, else the closest keyword of
    the call (``return_lsee``: 'return_lse'), else the inputs there are."""
    if name in params:
        return f"'{name}' is a parameter of the pattern: set it when compiling, compile_attention(..., {name}=...)"
    if name in COMPILE_KEYWORDS:
        return f"'{name}' is set when compiling, compile_attention(..., {name}=...), not per call"
    if name in PAGED_KEYWORDS:
        return f"'{name}' is a keyword of a paged call only (block_table=, cache_seqlens=): {PAGED_KEYWORDS[name]}"
    if name in FOREIGN_KEYWORDS:
        return f"'{name}' is not an attnc keyword: {FOREIGN_KEYWORDS[name]}"
    close = did_you_mean(name, declared)
    if close:
        return close
    keyword = did_you_mean(name, CALL_KEYWORDS)
    if keyword:
        return f"{keyword} (a keyword of the call, not an input)"
    return "inputs: " + ", ".join(declared) if declared else "this pattern takes no inputs"
