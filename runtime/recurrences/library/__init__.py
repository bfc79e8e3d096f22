"""The recurrence families' shared Triton library, as flash-linear-attention's ``ops/common``: the device helpers
every family's kernels call (``device``), the split prefix sums of decay gates that the decay and KDA kernels and
the decay family's torch path read (``gates``), and the host side of wrapping and launching the kernels
(``host``). Each family's ``triton.py`` keeps only its own passes; families never import each other
(``tests/project/test_imports.py``)."""
