"""The delta rule (DeltaNet, Gated DeltaNet, Kimi Delta Attention): ``naive`` (the token-by-token
definition, the source of truth) and ``chunk`` (the chunked form in torch: per chunk a triangular
solve, then the state pass between chunks). No Triton kernels yet."""
