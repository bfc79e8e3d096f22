"""The compiler's code generation room: a pattern's kernels as source: Triton's (``triton``), FlexAttention's
``mask_mod`` / ``score_mod`` (``flex``), the expression printer they share and the exact tables of grid terms they
read."""
