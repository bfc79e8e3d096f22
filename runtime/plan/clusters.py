"""Clustering routes (``cluster(q | k, CENTROIDS)``, the Routing Transformer): the cluster id of every
query and key vector, computed on q's device once per call, and the online k-means update of the
centroids (the training side).

The ids become the derived inputs the checker declared (``ir.InputDecl.derived``, ``int[heads, n]``
read at ``[h, q]``, ``int[heads, nk]`` at ``[h, k]``): from there on a clustered mask is a mask with
call-time per-token ids, like a document mask, and every backend classifies and runs it with that
machinery (per-tile min/max summaries, FULL / PARTIAL / EMPTY tiles, the exact mask on PARTIAL ones).

Rule (spec/REFERENCE.md): ``cluster(x)[b, h, t] = argmax_c x[b, h, t] . centroids[h, c]``, in fp32 (fp64
for fp64 inputs), ties to the lower index; the key vector of query head h is that of its KV head
``h // (Hq // Hkv)`` (GQA). Not differentiated.
"""

from __future__ import annotations

import torch

from ...core import ir
from ...core.errors import SpecError
from . import vertical_slash
from .route_scores import head_dots

#: The derived inputs that are score tables a bias reads (differentiated through their making), not ids a mask reads
SCORE_TABLES = ("relative", "landmark")


def _source(d: ir.InputDecl) -> str:
    return {"cluster": "cluster()", "relative": "relative()", "landmark": "landmark()"}.get(
        d.derived[0], "the vertical-slash route")


def derived_inputs(pat) -> tuple[ir.InputDecl, ...]:
    """The inputs of ``pat`` computed at call time (never passed by the caller)."""
    return tuple(d for d in getattr(pat, "inputs", ()) if d.derived is not None)


def mask_derived_inputs(pat) -> tuple[ir.InputDecl, ...]:
    """The derived inputs a mask reads (cluster ids, vertical-slash flags): not the score tables
    (``relative()``'s, ``landmark()``'s)."""
    return tuple(d for d in derived_inputs(pat) if d.derived[0] not in SCORE_TABLES)


def relative_logits(q: torch.Tensor, embeddings: torch.Tensor, scale: float, positions: int) -> torch.Tensor:
    """``relative(E, r)``'s table: ``scale * q . E[r]`` for every query and row r between two zero columns (the
    value of a row outside E, below and above), ``[B, Hq, positions, ROWS + 2]``. ``q`` ``[B, Hq, Nq, D]`` holds the last Nq
    of ``positions`` tokens (queries after a KV cache); the rows of the earlier positions, which no query
    holds, are 0. ``embeddings`` ``[ROWS, D]``, ``[Hq, ROWS, D]`` or ``[B, Hq, ROWS, D]``. In float32 (float64 for
    float64 q), as the kernels read a bias: half-precision q and E are multiplied with a float32 result.
    Differentiable in q and E: the bias's gradient reaches them through it."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    emb = embeddings.to(dt)
    emb = emb[None, None] if emb.dim() == 2 else emb[None] if emb.dim() == 3 else emb
    table = scale * (q.to(dt) @ emb.transpose(-1, -2))  # [B, Hq, Nq, ROWS]: the skewing's q E^T, no n x n x dk tensor
    return torch.nn.functional.pad(table, (1, 1, positions - q.shape[2], 0))


def landmark_gates(q: torch.Tensor, k: torch.Tensor, block: int, scale: float, positions: int) -> torch.Tensor:
    """``landmark(BLOCK)``'s table ``[B, Hq, positions, ceil(Nk / BLOCK)]``: for each query and block c, ``s(q,
    landmark) - logsumexp_j s(q, j)`` over block c's other keys, ``s = scale * q . k`` (each query head against its
    K/V head), the landmark the block's last key; 0 for a last block shorter than BLOCK (no landmark) and at the
    positions before the queries (a KV cache's earlier rows, which no query holds). In float32 (float64 for float64
    q), as the kernels read a bias. Differentiable in q and k; made a run of queries at a time, each run recomputed
    in the backward (``torch.utils.checkpoint``), so nothing ``Nq x Nk`` is held for the gradient."""
    dt = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, Hq, Nq, _ = q.shape
    Nk = k.shape[2]
    whole = Nk // block  # blocks with their landmark
    rows = max(1, (1 << 24) // max(1, B * Hq * Nk))

    def gates(qr: torch.Tensor, kd: torch.Tensor) -> torch.Tensor:
        s = scale * head_dots(qr, kd)
        blocks = s[..., :whole * block].unflatten(-1, (whole, block))
        return blocks[..., -1] - torch.logsumexp(blocks[..., :-1], -1)

    kd = k.to(dt)
    parts = []
    for start in range(0, Nq, rows):
        qr = q[:, :, start:start + rows].to(dt)
        if torch.is_grad_enabled() and (qr.requires_grad or kd.requires_grad):
            parts.append(torch.utils.checkpoint.checkpoint(gates, qr, kd, use_reentrant=False))
        else:
            parts.append(gates(qr, kd))
    table = torch.cat(parts, 2)
    return torch.nn.functional.pad(table, (0, -(-Nk // block) - whole, positions - Nq, 0))


def _check_embeddings(decl: ir.InputDecl, t, q: torch.Tensor, rows: int) -> torch.Tensor:
    """The relative embeddings checked against ``float[ROWS, dk]`` or ``float[heads, ROWS, dk]`` (optional
    batch), naming the input."""
    name = decl.name
    B, Hq, _, D = q.shape
    want = [Hq, rows, D] if len(decl.dims) == 3 else [rows, D]
    if t is None:
        raise SpecError(f"missing input '{name}' (float[{', '.join(decl.dim_names)}] = {want})", where=f"argument {name}",
                        hint=f"pass {name}= (the relative embeddings of relative())")
    if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
        got = f"a {t.dtype} tensor" if isinstance(t, torch.Tensor) else type(t).__name__
        raise SpecError(f"input '{name}' is a float tensor, got {got}", where=f"argument {name}")
    if t.device != q.device:
        raise SpecError(f"input '{name}' is on {t.device}, q on {q.device}", where=f"argument {name}",
                        hint="pass every input on q's device")
    if list(t.shape) != want and not (len(decl.dims) == 3 and t.dim() == 4 and list(t.shape[1:]) == want
                                      and t.shape[0] == B):
        raise SpecError(f"input '{name}' has shape {list(t.shape)}, expected [{', '.join(decl.dim_names)}] = {want} "
                        f"(dk from q{', heads from q, an optional leading batch dimension of ' + str(B) if len(want) == 3 else ''})",
                        where=f"argument {name}")
    return t


def cluster_ids(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """``argmax_c x . centroids[h, c]`` (ties to the lower index): int64 ``[B, H, N]`` for ``x``
    ``[B, H, N, D]`` and ``centroids`` ``[H, C, D]`` or ``[B, H, C, D]``. Not differentiated."""
    dtype = torch.float64 if torch.float64 in (x.dtype, centroids.dtype) else torch.float32
    with torch.no_grad():
        c = centroids.detach().to(dtype)
        c = c[None] if c.dim() == 3 else c
        score = x.detach().to(dtype) @ c.transpose(-1, -2)  # [B, H, N, C]
        # torch.argmax returns the first of equal maxima; a NaN score counts as no match (-inf)
        return torch.nan_to_num(score, nan=-torch.inf).argmax(-1)


def _check_centroids(decl: ir.InputDecl, t, q: torch.Tensor, clusters: int) -> torch.Tensor:
    """The centroids tensor checked against ``float[heads, clusters, dk]`` (optional batch), naming it."""
    name = decl.name
    B, Hq, _, D = q.shape
    want = [Hq, clusters, D]
    if t is None:
        raise SpecError(
            f"missing input '{name}' (float[{', '.join(decl.dim_names)}] = {want})",
            where=f"argument {name}",
            hint=f"pass {name}= (the centroids of cluster())",
        )
    if not isinstance(t, torch.Tensor):
        raise SpecError(f"expected a tensor, got {type(t).__name__}", where=f"argument {name}")
    if not t.dtype.is_floating_point:
        raise SpecError(
            f"input '{name}' is float, got a {t.dtype} tensor", where=f"argument {name}"
        )
    if t.is_meta or t.device != q.device:
        raise SpecError(
            f"input '{name}' is on {t.device}, q on {q.device}",
            where=f"argument {name}",
            hint="pass every input on q's device",
        )
    if list(t.shape) != want and not (
        t.dim() == 4 and list(t.shape[1:]) == want and t.shape[0] == B
    ):
        raise SpecError(
            f"input '{name}' has shape {list(t.shape)}, expected [{', '.join(decl.dim_names)}] = {want} "
            f"(heads and dk from q) with an optional leading batch dimension of {B}",
            where=f"argument {name}",
        )
    return t


def derive_inputs(pat, q: torch.Tensor, k: torch.Tensor, inputs: dict, scale: float | None = None, *,
                  mask_only: bool = False) -> dict:
    """``inputs`` with the cluster ids of this call added (``q`` ``[B, Hq, Nq, D]``, ``k``
    ``[B, Hkv, Nk, D]``, both in attnc's layout). Queries after a KV cache (``Nk > Nq``,
    self-attention) stand at positions ``Nk - Nq ..``: the ids of the earlier positions, which no
    query holds, are -1. A vertical-slash route's flags come from ``vertical_slash.derive`` (scores
    at ``scale``, default ``D ** -0.5``); ``relative()``'s table from ``relative_logits`` (not with
    ``mask_only``: only what a mask reads). A derived input given by the caller is refused, naming it."""
    derived = mask_derived_inputs(pat) if mask_only else derived_inputs(pat)
    if not derived:
        return inputs
    for d in derived:
        if d.name in inputs:
            raise SpecError(
                f"'{d.name}' is computed from q and k at every call ({_source(d)}); it is not an argument",
                where=f"argument {d.name}",
            )
    out = dict(inputs)
    B, Hq, Nq, _ = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    if vertical_slash.rule_of(pat) is not None:
        out.update(vertical_slash.derive(pat, q, k, scale))
    for d in derived:
        if d.derived[0] == "relative":
            emb_decl = next(i for i in pat.inputs if i.name == d.derived[2])
            emb = _check_embeddings(emb_decl, inputs.get(emb_decl.name), q, int(emb_decl.dims[-2]))
            out[d.name] = relative_logits(q, emb, q.shape[-1] ** -0.5 if scale is None else scale,
                                          Nk if pat.self_attention and Nk > Nq else Nq)
            continue
        if d.derived[0] == "landmark":
            out[d.name] = landmark_gates(q, k, d.derived[2], q.shape[-1] ** -0.5 if scale is None else scale,
                                         Nk if Nk > Nq else Nq)
            continue
        if d.derived[0] != "cluster":
            continue
        _, side, cent_name = d.derived
        cent_decl = next(i for i in pat.inputs if i.name == cent_name)
        clusters = int(cent_decl.dims[1])
        centroids = _check_centroids(cent_decl, inputs.get(cent_name), q, clusters)
        if side == "q":
            ids = cluster_ids(q, centroids)
            if (
                pat.self_attention and Nk > Nq
            ):  # positions before the queries: no vector, no cluster
                ids = torch.cat([ids.new_full((B, Hq, Nk - Nq), -1), ids], dim=-1)
        else:
            ids = cluster_ids(k.repeat_interleave(Hq // Hkv, dim=1) if Hkv != Hq else k, centroids)
        out[d.name] = ids
    return out


def kmeans_update(centroids: torch.Tensor, x: torch.Tensor, decay: float = 0.999) -> torch.Tensor:
    """One step of the Routing Transformer's online k-means (lucidrains/routing-transformer at commit
    0283dd4a, ``Kmeans.update`` after one batch): each vector of ``x`` ``[B, H, N, D]`` (e.g. q and k
    concatenated along the tokens) is L2-normalised and assigned to its nearest centroid of
    ``centroids`` ``[H, C, D]`` (``cluster_ids``); per head, the assigned vectors are summed over the
    batch and the tokens and the sum L2-normalised; each centroid becomes
    ``decay * centroid + (1 - decay) * that mean`` (a centroid with no vector keeps its value).
    Returns the new centroids (``centroids``' dtype); nothing is differentiated."""
    if (
        not isinstance(centroids, torch.Tensor)
        or centroids.dim() != 3
        or not centroids.dtype.is_floating_point
    ):
        raise SpecError(
            "expected float centroids [heads, clusters, dk]", where="argument centroids"
        )
    H, C, D = centroids.shape
    if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != H or x.shape[3] != D:
        shape = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise SpecError(
            f"expected vectors [B, {H}, N, {D}] (heads and dk of the centroids), got {shape}",
            where="argument x",
        )
    if C == 0:
        raise SpecError("expected at least one centroid, got [heads, 0, dk]", where="argument centroids")
    if x.device != centroids.device or x.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise SpecError(f"expected float vectors on the centroids' device ({centroids.device}), got {x.dtype} on "
                        f"{x.device}", where="argument x")
    if isinstance(decay, bool) or not isinstance(decay, int | float) or not 0 <= decay <= 1:
        raise SpecError(f"decay must be a number in [0, 1], got {decay!r}", where="argument decay")
    with torch.no_grad():
        dtype = torch.float64 if torch.float64 in (x.dtype, centroids.dtype) else torch.float32
        xn = torch.nn.functional.normalize(x.detach().to(dtype), dim=-1)
        c = centroids.detach().to(dtype)
        ids = cluster_ids(xn, c)  # [B, H, N]
        sums = torch.zeros(H, C, D, dtype=dtype, device=x.device)
        flat = ids.transpose(0, 1).reshape(H, -1)  # [H, B * N]
        sums.scatter_add_(
            1, flat[..., None].expand(H, flat.shape[1], D), xn.transpose(0, 1).reshape(H, -1, D)
        )
        count = torch.zeros(H, C, dtype=dtype, device=x.device).scatter_add_(
            1, flat, torch.ones_like(flat, dtype=dtype)
        )
        mean = torch.nn.functional.normalize(sums, dim=-1)
        new = torch.where(count[..., None] > 0, decay * c + (1 - decay) * mean, c)
        return new.to(centroids.dtype)


def sample_derived(
    pat, bound, inputs: dict, head_dim: int, seed: int = 0
) -> tuple[dict, list[str]]:
    """For the simulator and ``attnc show``, which have no q and k: ``inputs`` completed with cluster ids
    (vertical-slash flags) of a seeded sample (q, k and missing centroids standard normal, ``seed``), and one note per
    sampled thing saying so. Unchanged when the pattern clusters nothing or the ids are given."""
    derived = mask_derived_inputs(pat)
    if not derived or all(d.name in inputs for d in derived):
        return inputs, []
    g = torch.Generator().manual_seed(seed)
    nq = bound.n  # the query rows (after a KV cache, the last n of the nk tokens)
    q = torch.randn(1, bound.heads, nq, head_dim, generator=g, dtype=torch.float64)
    k = torch.randn(1, bound.heads, bound.nk, head_dim, generator=g, dtype=torch.float64)
    out, notes = dict(inputs), []
    for name in dict.fromkeys(d.derived[2] for d in derived if d.derived[0] == "cluster"):
        if name not in out:
            decl = next(i for i in pat.inputs if i.name == name)
            out[name] = torch.randn(
                bound.heads, int(decl.dims[1]), head_dim, generator=g, dtype=torch.float64
            )
            notes.append(
                f"input '{name}' not given: simulated with standard normal centroids, shape "
                f"{list(out[name].shape)} (seed {seed})"
            )
    if any(d.derived[0] == "cluster" for d in derived):
        notes.append(
            f"cluster() depends on the q and k vectors: its ids come from standard normal q and k "
            f"(head dim {head_dim}, seed {seed}); real data clusters differently"
        )
    if vertical_slash.rule_of(pat) is not None:
        notes.append(
            f"the vertical-slash route depends on the q and k vectors: its columns and diagonals are "
            f"selected from standard normal q and k (head dim {head_dim}, seed {seed}); real attention "
            f"concentrates differently"
        )
    return derive_inputs(
        pat, q, k, {n: t for n, t in out.items() if n not in {d.name for d in derived}}, mask_only=True
    ), notes
