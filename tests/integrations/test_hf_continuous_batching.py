"""attnc in transformers' continuous batching (``generate_batch`` over HF's paged cache): tiny
random Llama and Mistral built offline; greedy tokens compared with HF's own ``paged|eager``
(causal) and with a naive masked attention run request by request (sliding window); the packed
call itself against a float64 per-row reference."""

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import attnc  # noqa: E402
from attnc.integrations import transformers as hf  # noqa: E402

CAUSAL = "pattern cb_causal\n  tokens seq\n  mask causal\n"
WINDOW = 3
# Prompts of different lengths; with 8 tokens per batch HF chunks the longer prefills, so steps
# mix prefill-only rows, chunks whose keys extend past their queries and single decode tokens.
PROMPTS = [[1, 5, 7, 9, 11], [2, 3], [4, 8, 15, 16, 23, 42, 17], [6], [9, 9, 3]]
NEW_TOKENS = 6


def _naive_window(module, query, key, value, attention_mask, scaling=None, **kwargs):
    """Causal sliding-window attention written out: the queries are the last keys (HF's dynamic
    cache, one request at a time), key j is visible to query position p iff 0 <= p - j < WINDOW."""
    assert attention_mask is None and query.shape[0] == 1
    n, nk = query.shape[2], key.shape[2]
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    pos_q = torch.arange(nk - n, nk)[:, None]
    pos_k = torch.arange(nk)[None, :]
    keep = (pos_k <= pos_q) & (pos_q - pos_k < WINDOW)
    scores = (query @ key.transpose(-1, -2) * scaling).masked_fill(~keep, float("-inf"))
    return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module", autouse=True)
def registered():
    hf.register("cb_causal", CAUSAL)
    hf.register("cb_swa3", "stdlib:sliding_window", window=WINDOW)
    transformers.AttentionInterface.register("cb_naive_swa3", _naive_window)
    # HF's scheduler thread and the caller's each start torch's intra-op pool: on a few shared
    # cores that oversubscription makes every tiny matmul slow.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(kind: str):
    torch.manual_seed({"llama": 0, "mistral": 1}[kind])
    common = dict(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common))
    else:  # sliding layers: HF's paged cache keeps only their last keys
        model = transformers.MistralForCausalLM(
            transformers.MistralConfig(**common, sliding_window=4)
        )
    return model.eval()


def _generate_batch(model, impl):
    model.set_attn_implementation(impl)
    gen = transformers.GenerationConfig(
        max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=-1, pad_token_id=0
    )
    cb = transformers.ContinuousBatchingConfig(page_size=16, num_blocks=16, max_batch_tokens=8)
    out = model.generate_batch(
        PROMPTS, generation_config=gen, continuous_batching_config=cb, warmup=False
    )
    tokens = [o.generated_tokens for o in out.values()]
    assert len(tokens) == len(PROMPTS) and all(len(t) == NEW_TOKENS for t in tokens)
    return tokens


def _spy(monkeypatch):
    """The packed batches that reach attnc: (queries, keys) per row."""
    seen = []
    orig = hf._Implementation._packed

    def spy(self, attn, query, key, value, cu_q, cu_k, scaling):
        rows = list(zip(cu_q.diff().tolist(), cu_k.diff().tolist(), strict=True))
        seen.append(rows)
        return orig(self, attn, query, key, value, cu_q, cu_k, scaling)

    monkeypatch.setattr(hf._Implementation, "_packed", spy)
    return seen


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_causal_matches_paged_eager(kind, monkeypatch):
    """The same greedy tokens as HF's paged|eager, through prefills, chunked prefills beside
    decodes, and decodes; Mistral's sliding layers through HF's sliding page allocator."""
    model = _model(kind)
    seen = _spy(monkeypatch)
    ours = _generate_batch(model, "cb_causal")
    assert model.config._attn_implementation == "cb_causal"  # admitted as it is
    assert ours == _generate_batch(model, "paged|eager")
    rows = [r for step in seen for r in step]
    assert any(all(q == k for q, k in step) for step in seen)  # one cu_seqlens call
    assert any(1 < q < k for q, k in rows)  # a prefill chunk after earlier keys
    assert any(len({q for q, _ in step if q}) > 1 for step in seen)  # mixed query counts
    assert any(all(q == 1 for q, _ in step) for step in seen)  # decode only


def test_sliding_window_matches_per_row_reference():
    """stdlib:sliding_window (3) in continuous batching equals each request generated alone by
    HF's ordinary generate with a naive masked attention; the window changes the tokens."""
    model = _model("llama")
    ours = _generate_batch(model, "cb_swa3")

    def alone(impl, prompt):
        model.set_attn_implementation(impl)
        ids = torch.tensor([prompt])
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, len(prompt) :].tolist()

    assert ours == [alone("cb_naive_swa3", p) for p in PROMPTS]
    assert ours != [alone("sdpa", p) for p in PROMPTS]  # causal without the window


def test_generate_with_paged_cache_implementation():
    """``generate(..., cache_implementation="paged")`` routes to continuous batching too."""
    model = _model("llama")
    model.generation_config.eos_token_id = None  # every request runs its max_new_tokens
    ids = torch.tensor([PROMPTS[0], [9, 8, 7, 6, 5]])
    model.set_attn_implementation("cb_causal")
    with torch.no_grad():
        out = model.generate(
            ids, max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="paged"
        )
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
    # HF returns the prompts and their tokens as [1, requests, length]
    assert torch.equal(torch.as_tensor(out).reshape(ids.shape[0], -1)[:, -3:], ref[:, -3:])


def test_other_names_keep_transformers_refusal():
    """Only attnc's names are admitted: another registered function is refused by HF as before."""
    transformers.AttentionInterface.register("cb_other", _naive_window)
    model = _model("llama")
    model.set_attn_implementation("cb_other")
    with pytest.raises(ValueError, match="cb_other is not supported for continuous batching"):
        _generate_batch(model, "cb_other")


def _rows_reference(query, key, value, rows, scaling, window=None):
    """float64, row by row: row r's queries are the last of its keys."""
    out = torch.zeros(
        query.shape[0], query.shape[1], query.shape[2], value.shape[3], dtype=query.dtype
    )
    groups = query.shape[1] // key.shape[1]
    q0 = k0 = 0
    for n, nk in rows:
        q = query[0, :, q0 : q0 + n]
        k = key[0, :, k0 : k0 + nk].repeat_interleave(groups, 0)
        v = value[0, :, k0 : k0 + nk].repeat_interleave(groups, 0)
        pos_q, pos_k = torch.arange(nk - n, nk)[:, None], torch.arange(nk)[None, :]
        keep = pos_k <= pos_q
        if window is not None:
            keep &= pos_q - pos_k < window
        scores = (q @ k.transpose(-1, -2) * scaling).masked_fill(~keep, float("-inf"))
        out[0, :, q0 : q0 + n] = scores.softmax(-1) @ v
        q0, k0 = q0 + n, k0 + nk
    return out.transpose(1, 2)


@pytest.mark.parametrize("name, window", [("cb_causal", None), ("cb_causal", 2), ("cb_swa3", None)])
def test_packed_call_matches_rows(name, window):
    """The packed call as HF makes it: rows with more keys than queries, one without queries, a
    padded query at the end (zeros); with the layer's sliding_window ANDed in."""
    fn = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.get_interface(name, None)
    rows = [(2, 5), (1, 3), (3, 3), (0, 2), (1, 1), (1, 6)]
    torch.manual_seed(3)
    total_q, total_k = sum(n for n, _ in rows) + 1, sum(nk for _, nk in rows)
    q = torch.randn(1, 4, total_q, 8, dtype=torch.float64)
    k = torch.randn(1, 2, total_k, 8, dtype=torch.float64)
    v = torch.randn(1, 2, total_k, 8, dtype=torch.float64)
    cu_q = torch.tensor([0] + [sum(n for n, _ in rows[: i + 1]) for i in range(len(rows))]).int()
    cu_k = torch.tensor([0] + [sum(nk for _, nk in rows[: i + 1]) for i in range(len(rows))]).int()
    out, weights = fn(
        torch.nn.Module().eval(),
        q,
        k,
        v,
        None,
        scaling=0.3,
        sliding_window=window,
        cu_seq_lens_q=cu_q,
        cu_seq_lens_k=cu_k,
        max_length_q=3,
        max_length_k=6,
    )
    both = [w for w in (window, WINDOW if name == "cb_swa3" else None) if w is not None]
    ref = _rows_reference(q, k, v, rows, 0.3, min(both) if both else None)
    assert weights is None and out.shape == (1, total_q, 4, 8)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert not out[0, -1].any()


def test_packed_prefill_is_one_varlen_call():
    """Rows with as many queries as keys: the same as running each alone, and differentiable."""
    fn = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.get_interface("cb_causal", None)
    torch.manual_seed(4)
    q = torch.randn(1, 4, 7, 8, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 7, 8, dtype=torch.float64) for _ in range(2))
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    out, _ = fn(torch.nn.Module(), q, k, v, None, scaling=0.5, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    ref = _rows_reference(q.detach(), k, v, [(3, 3), (4, 4)], 0.5)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-10, atol=1e-10)
    out.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_packed_refusals():
    fn = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.get_interface("cb_causal", None)
    q = torch.randn(1, 4, 3, 8)
    k = v = torch.randn(1, 2, 3, 8)
    cu = torch.tensor([0, 3], dtype=torch.int32)
    module = torch.nn.Module()
    with pytest.raises(attnc.SpecError, match="without an attention mask"):
        fn(module, q, k, v, torch.zeros(1, 1, 3, 3), cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(attnc.SpecError, match="queries are the row's last"):
        fn(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 2]).int())
    with pytest.raises(attnc.SpecError, match="cu_seq_lens_k"):
        fn(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k={"full_attention": cu})
    with pytest.raises(attnc.SpecError, match="rows of queries"):
        fn(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 1, 3]).int())


def test_on_triton_every_mixed_step_is_one_paged_launch(monkeypatch):
    """Registered on the Triton backend (the interpreter here), inference: the same greedy tokens as HF's
    paged|eager, and every packed layer call (prefills, decode rows beside prefill chunks) is one
    ``attnc_fwd_paged`` launch (the packed keys as one-key pages, each row's queries by cu_seqlens_q), none of
    them grouped by query count on the host."""
    from attnc.runtime.backends.triton import kernel_launch as KL

    hf.register("cb_causal_triton", CAUSAL, backend="triton")
    model = _model("llama")
    launched, per_call = [], []
    real = KL.launch_kernel

    def count(launch, kernel, grid, args, meta, *, backward):
        launched.append(kernel.__name__)
        return real(launch, kernel, grid, args, meta, backward=backward)

    one_call, packed = hf._Implementation._one_paged_call, hf._Implementation._packed

    def one(self, attn, query, key, value, cu_q, cu_k, *args):
        before = len(launched)
        out = one_call(self, attn, query, key, value, cu_q, cu_k, *args)
        per_call.append((out is None, launched[before:]))
        return out

    def grouped(self, attn, query, key, value, cu_q, cu_k, scaling):
        prefill_only.append(torch.equal(cu_q, cu_k) and int(cu_q[-1]) == key.shape[2])
        return packed(self, attn, query, key, value, cu_q, cu_k, scaling)

    prefill_only: list = []
    monkeypatch.setattr(KL, "launch_kernel", count)
    monkeypatch.setattr(hf._Implementation, "_one_paged_call", one)
    monkeypatch.setattr(hf._Implementation, "_packed", grouped)
    ours = _generate_batch(model, "cb_causal_triton")
    monkeypatch.undo()
    assert ours == _generate_batch(model, "paged|eager")
    paged = [names for declined, names in per_call if not declined]
    assert paged and all([n for n in names if n != "attnc_fwd_combine"] == ["attnc_fwd_paged"] for names in paged)
    assert len(paged) == len(per_call) and prefill_only == []  # no call fell back to the host's grouping
