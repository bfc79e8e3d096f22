"""Titans' neural memory (Behrouz, Zhong and Mirrokni, 2024), a linear memory trained at test time by gradient
descent with momentum and weight decay: ``naive`` (token by token, the source of truth), ``chunk`` (the chunked
form in torch) and ``rule`` (its registration). No Triton kernels yet."""
