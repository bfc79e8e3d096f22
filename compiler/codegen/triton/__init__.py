"""Triton code generation: a pattern's kernels as readable Triton source (``source.generate_source``),
built from the tile code (``tiles``), score terms (``scores``, ``bias``, ``exprs``), kernel bodies
(``kernels``) and helper functions (``helpers``)."""
