"""attnc as a transformers attention implementation: tiny random Llama (GQA), Mistral
(sliding window) and Gemma 2 (softcap, alternating sliding layers) built offline, logits and
greedy generations compared with transformers' own sdpa / eager attention."""

import pytest

transformers = pytest.importorskip("transformers")

import torch  # noqa: E402

import attnc  # noqa: E402
from attnc.integrations import transformers as hf  # noqa: E402

CAUSAL = "pattern hf_causal\n  tokens seq\n  mask causal\n"
VOCAB = 48


def _dense64(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, **kwargs
):
    """HF's eager attention without its float32 softmax: an exact float64 reference."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = query @ key.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if (
        attention_mask is not None
    ):  # HF's eager mask: 0 or the dtype's minimum, causal/window/padding
        scores = scores + attention_mask[..., : key.shape[2]]
    return (scores.softmax(-1) @ value).transpose(1, 2).contiguous(), None


@pytest.fixture(scope="module", autouse=True)
def registered():
    hf.register("attnc_causal", CAUSAL)
    hf.register("attnc_swa3", "stdlib:sliding_window", window=3)
    transformers.AttentionInterface.register("dense64", _dense64)
    transformers.masking_utils.AttentionMaskInterface.register(
        "dense64", transformers.masking_utils.eager_mask
    )


def _model(kind: str, dtype=torch.float64, **extra):
    torch.manual_seed({"llama": 0, "mistral": 1, "gemma2": 2}[kind])
    common = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=None,
        bos_token_id=None,
    )
    if kind == "llama":
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**common, **extra))
    elif kind == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**common, **extra))
    else:
        cfg = transformers.Gemma2Config(
            **common,
            head_dim=8,
            query_pre_attn_scalar=5,
            attn_logit_softcapping=0.7,
            final_logit_softcapping=None,
            sliding_window=3,
            layer_types=["sliding_attention", "full_attention"],
            **extra,
        )
        model = transformers.Gemma2ForCausalLM(cfg)
    return model.to(dtype).eval()


def _batch(lengths, total, left):
    torch.manual_seed(5)
    ids = torch.randint(1, VOCAB, (len(lengths), total))
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        if left:
            mask[b, total - n :] = 1
        else:
            mask[b, :n] = 1
    return ids * mask, mask


def _logits(model, impl, ids, mask):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(ids, attention_mask=mask).logits


def _generate(model, impl, ids, mask, steps, **kw):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=steps, do_sample=False, pad_token_id=0, **kw
        )


def _spy(monkeypatch):
    """Counts the calls that reach attnc, with the shapes HF gives it."""
    seen = []
    orig = hf._Implementation.module

    def spy(self, padded, window, softcap, causal=False):
        attn = orig(self, padded, window, softcap, causal)

        def call(query, key, value, **kw):
            seen.append((query.shape[2], key.shape[2], padded, window))
            return attn(query, key, value, **kw)

        return call

    monkeypatch.setattr(hf._Implementation, "module", spy)
    return seen


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_logits_match_sdpa_and_eager_without_padding(kind, monkeypatch):
    extra = {"sliding_window": 3} if kind == "mistral" else {}
    model = _model(kind, **extra)
    ids, mask = _batch([9, 9], 9, left=False)
    seen = _spy(monkeypatch)
    ours = _logits(model, "attnc_causal", ids, None)
    assert len(seen) == 2 and seen[0][2] is False  # both layers ran through attnc, no padding input
    assert seen[0][3] == (3 if kind == "mistral" else None)
    for impl in ("sdpa", "dense64"):
        torch.testing.assert_close(ours, _logits(model, impl, ids, None), rtol=1e-10, atol=1e-10)
    # HF's eager attention takes its softmax in float32 even for float64 models.
    torch.testing.assert_close(ours, _logits(model, "eager", ids, None), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_padded_forward_matches_sdpa(kind, left, monkeypatch):
    extra = {"sliding_window": 3} if kind == "mistral" else {}
    model = _model(kind, **extra)
    ids, mask = _batch([9, 5, 2], 9, left=left)
    seen = _spy(monkeypatch)
    ours = _logits(model, "attnc_causal", ids, mask)
    assert seen and all(s[2] for s in seen)  # the padding reached every layer
    valid = mask.bool()
    assert not ours.isnan().any()  # left padding: rows with no real key come out finite
    for impl in ("sdpa", "dense64"):
        torch.testing.assert_close(
            ours[valid], _logits(model, impl, ids, mask)[valid], rtol=1e-10, atol=1e-10
        )
    if left:  # the padding matters there: without it the short rows differ
        assert not torch.allclose(
            _logits(model, "attnc_causal", ids, None)[valid], ours[valid], atol=1e-6
        )


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_left_padded_generate_matches_sdpa(kind, monkeypatch):
    # Mistral's window 3 is shorter than the prompt: the sliding cache keeps 2 keys.
    extra = {"sliding_window": 3} if kind == "mistral" else {}
    model = _model(kind, **extra)
    ids, mask = _batch([7, 4, 1], 7, left=True)
    seen = _spy(monkeypatch)
    ours = _generate(model, "attnc_causal", ids, mask, 6)
    # Decode steps: one query after the cached keys. Mistral's sliding cache keeps its last 2 keys
    # (window - 1), so a step sees 3 and the padding only while a kept key is padding (the first
    # step); Llama's sees the whole sequence and its padding at every step.
    steps = [(k, padded) for q, k, padded, _ in seen if q == 1]
    assert len(steps) == 2 * 5 and max(k for k, _ in steps) == (3 if kind == "mistral" else 7 + 5)
    assert sum(p for _, p in steps) == (2 if kind == "mistral" else 2 * 5)
    assert torch.equal(ours, _generate(model, "sdpa", ids, mask, 6))
    # The last step's logits agree too (all positions of a left-padded batch's last token are valid).
    full = torch.cat([mask, torch.ones(3, 6, dtype=torch.long)], dim=1)
    ours_logits = _logits(model, "attnc_causal", ours, full)
    assert not ours_logits.isnan().any()
    torch.testing.assert_close(
        ours_logits[full.bool()],
        _logits(model, "sdpa", ours, full)[full.bool()],
        rtol=1e-10,
        atol=1e-10,
    )


def test_a_pattern_that_reads_positions_sees_a_left_padded_row_as_the_row_alone():
    """Attention sinks (``k < sinks``) read where a key is: under left padding each padded row runs alone on its
    tokens (``_left_padded``), so its logits and greedy tokens are the row's own, not those of a row whose first
    positions are pads (the sinks were pad tokens, masked out: no sink at all). A pattern of ``q - k`` only keeps
    the one call for the batch."""
    hf.register("attnc_sinks", "stdlib:streaming", window=3, sinks=2)
    assert hf.reads_positions(attnc.load("stdlib:streaming", window=3, sinks=2))
    assert not hf.reads_positions(attnc.load(CAUSAL)) and not hf.reads_positions(attnc.load("stdlib:sliding_window",
                                                                                              window=3))
    model = _model("llama")
    ids, mask = _batch([7, 4], 7, left=True)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # the row's own RoPE positions, as generate gives
    model.set_attn_implementation("attnc_sinks")
    with torch.no_grad():
        padded = model(ids, attention_mask=mask, position_ids=positions).logits[1, 3:]
        alone = model(ids[1:, 3:]).logits[0]
    torch.testing.assert_close(padded, alone, rtol=1e-10, atol=1e-10)
    batch = _generate(model, "attnc_sinks", ids, mask, 5)
    assert torch.equal(batch[1, 7:], _generate(model, "attnc_sinks", ids[1:, 3:], mask[1:, 3:], 5)[0, 4:])


@pytest.mark.parametrize("left", [False, True])
def test_gemma2_softcap_scaling_and_alternating_windows(left, monkeypatch):
    model = _model("gemma2")
    ids, mask = _batch([8, 4], 8, left=left)
    seen = _spy(monkeypatch)
    ours = _logits(model, "attnc_causal", ids, mask)
    assert {s[3] for s in seen} == {3, None}  # one sliding and one full layer
    valid = mask.bool()
    torch.testing.assert_close(
        ours[valid], _logits(model, "dense64", ids, mask)[valid], rtol=1e-10, atol=1e-10
    )
    if not left:  # HF eager: float32 softmax, and NaN on any fully padded row in float64
        torch.testing.assert_close(
            _logits(model, "attnc_causal", ids, None),
            _logits(model, "eager", ids, None),
            rtol=1e-6,
            atol=1e-6,
        )
    # The softcap is the model's: the same model without it gives other logits.
    model.config.attn_logit_softcapping = None
    for layer in model.model.layers:
        layer.self_attn.attn_logit_softcapping = None
    assert not torch.allclose(
        _logits(model, "attnc_causal", ids, mask)[valid], ours[valid], atol=1e-6
    )


def test_gemma2_left_padded_generate_matches_dense64():
    model = _model("gemma2")
    ids, mask = _batch([6, 3], 6, left=True)
    assert torch.equal(
        _generate(model, "attnc_causal", ids, mask, 5), _generate(model, "dense64", ids, mask, 5)
    )


def test_pattern_window_equals_model_window():
    """A window written in the pattern (no sliding_window in the config) is Mistral's window."""
    windowed = _model("mistral", sliding_window=3)
    plain = _model("mistral", sliding_window=None)
    plain.load_state_dict(windowed.state_dict())
    ids, mask = _batch([9, 6], 9, left=False)
    ours = _logits(plain, "attnc_swa3", ids, mask)
    ref = _logits(windowed, "sdpa", ids, mask)
    torch.testing.assert_close(ours[mask.bool()], ref[mask.bool()], rtol=1e-10, atol=1e-10)
    assert not torch.allclose(
        _logits(plain, "sdpa", ids, mask)[mask.bool()], ref[mask.bool()], atol=1e-6
    )


def test_layer_pattern_is_the_written_spec():
    """The model's conditions ANDed by the integration give the IR of the same spec written by hand."""
    base = attnc.load(CAUSAL)
    built = hf.layer_pattern(base, padded=True, window=4, softcap=30.0)
    text = attnc.load(
        f"pattern hf_causal\n  tokens seq\n  input {hf.PAD_INPUT}: int[n]\n"
        f"  mask causal and q - k < 4 and {hf.PAD_INPUT}[k] != 0\n  softcap 30.0\n"
    )
    assert built.key() == text.key()
    assert hf.layer_pattern(base) is base


def test_padding_mask_function_slices_the_sliding_cache():
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    # A sliding layer whose cache keeps keys 4..5 plus one new query at position 6.
    assert hf._padding_mask(2, 1, 3, q_offset=6, kv_offset=4, attention_mask=am) is None  # all real
    pad = hf._padding_mask(2, 1, 4, q_offset=6, kv_offset=3, attention_mask=am[:, :7])
    assert pad is None
    pad = hf._padding_mask(2, 1, 6, q_offset=6, kv_offset=1, attention_mask=am)
    assert pad.shape == (2, 1, 1, 6) and pad.dtype == torch.bool
    assert pad[:, 0, 0].tolist() == [[False] + [True] * 5, [True] * 6]


def test_padding_mask_function_on_a_static_buffer():
    """A static cache: 9 slots, the query at position 6 (HF passes the offset as a tensor): the mask
    covers the 7 filled keys, also without padding (its length says where the queries end)."""
    am = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    pad = hf._padding_mask(2, 1, 9, q_offset=torch.tensor(6), attention_mask=am)
    assert pad[:, 0, 0].tolist() == [[False, False] + [True] * 5, [True] * 7]
    pad = hf._padding_mask(2, 1, 9, q_offset=torch.tensor(6), attention_mask=None, device="cpu")
    assert pad.shape == (2, 1, 1, 7) and bool(pad.all())
    # a prefill of 4 queries into the empty buffer; a 2-D mask shorter than the keys pads them
    pad = hf._padding_mask(2, 4, 9, q_offset=torch.tensor(0), attention_mask=am[:, :3])
    assert pad[:, 0, 0].tolist() == [[False, False, True, False], [True, True, True, False]]
    with pytest.raises(attnc.SpecError, match="outside the layer's keys") as err:
        hf._padding_mask(2, 4, 9, q_offset=torch.tensor(6), attention_mask=am)  # ends at 10 > 9
    assert err.value.where == "argument past_key_values"


def _static_steps(monkeypatch):
    """(buffer length, filled keys) of every attention call."""
    seen = []
    orig = hf._Implementation._key_padding

    def spy(self, mask, query, key):
        pad = orig(self, mask, query, key)
        seen.append((key.shape[2], pad.shape[1]))
        return pad

    monkeypatch.setattr(hf._Implementation, "_key_padding", spy)
    return seen


@pytest.mark.parametrize("left", [False, True])
@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_static_cache_generate_matches_sdpa(kind, left, monkeypatch):
    """generate(cache_implementation="static"): token for token HF's sdpa with the same static cache
    and with its dynamic one. Llama's layers get the whole 12-slot buffer and attend its filled keys;
    Mistral's window 3 is shorter than the prompt, so its static sliding layers hold 3 keys."""
    extra = {"sliding_window": 3} if kind == "mistral" else {}
    model = _model(kind, **extra)
    ids, mask = _batch([7, 4, 1] if left else [7, 7, 7], 7, left=left)
    seen = _static_steps(monkeypatch)
    ours = _generate(model, "attnc_causal", ids, mask, 6, cache_implementation="static")
    assert torch.equal(ours, _generate(model, "sdpa", ids, mask, 6, cache_implementation="static"))
    assert torch.equal(ours, _generate(model, "sdpa", ids, mask, 6))
    if kind == "llama":  # the prefill and 5 steps of 2 layers, each on the keys filled so far; the
        # last step fills the buffer, which needs a mask only for its padding
        assert seen == [(12, filled) for filled in range(7, 13 if left else 12) for _ in range(2)]
    elif left:  # the prefill overflows the 3 slots (HF hands over its 7 keys), then full, rolled
        # buffers of 3: padded only while a kept key is padding (the first step)
        assert seen == [(7, 7)] * 2 + [(3, 3)] * 2
    else:  # no padding, no partly filled buffer: no mask at all
        assert seen == []


def test_static_cache_generate_gemma2_matches_dense64():
    """Gemma 2: softcap, scaling, alternating sliding (3 slots) and full (12 slots) static layers."""
    model = _model("gemma2")
    ids, mask = _batch([6, 3], 6, left=True)
    ours = _generate(model, "attnc_causal", ids, mask, 6, cache_implementation="static")
    assert torch.equal(
        ours, _generate(model, "dense64", ids, mask, 6, cache_implementation="static")
    )
    assert torch.equal(ours, _generate(model, "attnc_causal", ids, mask, 6))


def test_refusals(monkeypatch):
    with pytest.raises(attnc.SpecError, match="argument name"):
        hf.register("sdpa", CAUSAL)
    with pytest.raises(attnc.SpecError, match="recurrence"):
        hf.register("attnc_x", "stdlib:retention")
    with pytest.raises(attnc.SpecError, match="doc"):
        hf.register("attnc_x", "stdlib:document")
    with pytest.raises(attnc.SpecError, match="tokens seq"):
        hf.register("attnc_x", "stdlib:neighborhood_2d", kernel_size=3)
    with pytest.raises(attnc.SpecError, match="backend"):
        hf.register("attnc_x", CAUSAL, backend="nope")
    with pytest.raises(attnc.SpecError, match="already loaded"):
        hf.register("attnc_x", attnc.load(CAUSAL), window=3)
    with pytest.raises(attnc.SpecError, match="softcap"):
        hf.layer_pattern(attnc.load("stdlib:softcap", cap=50.0), softcap=30.0)
    assert (
        hf.layer_pattern(attnc.load("stdlib:softcap", cap=50.0), softcap=50.0).softcap is not None
    )
    assert "attnc_x" not in transformers.AttentionInterface._global_mapping
    model = _model("llama")
    model.set_attn_implementation("attnc_causal")
    ids, _ = _batch([4], 4, left=False)
    four_d = torch.zeros(1, 1, 4, 4)
    with pytest.raises(attnc.SpecError, match="attention_mask"), torch.no_grad():
        model(ids, attention_mask=four_d)
    q, k = torch.zeros(1, 4, 2, 8), torch.zeros(1, 2, 5, 8)
    impl = transformers.AttentionInterface._global_mapping["attnc_causal"].__self__
    assert impl._key_padding(torch.ones(1, 1, 1, 3, dtype=torch.bool), q, k).shape == (1, 3)
    for bad in (
        torch.ones(1, 1, 2, 5, dtype=torch.bool),  # HF's sdpa mask: one row per query
        torch.ones(1, 1, 1, 6, dtype=torch.bool),  # more keys than the buffer holds
        torch.ones(1, 1, 1, 1, dtype=torch.bool),  # fewer keys than queries
        torch.zeros(1, 1, 1, 5),  # a float (additive) mask
    ):
        with pytest.raises(attnc.SpecError, match="keys' padding") as err:
            impl._key_padding(bad, q, k)
        assert err.value.where == "argument attention_mask"
    model.train()
    monkeypatch.setattr(model.model.layers[0].self_attn, "attention_dropout", 0.1)
    with pytest.raises(attnc.SpecError, match="dropout"):
        model(ids)


@pytest.mark.parametrize("kind", ["llama", "mistral"])
def test_packed_sequences_from_position_ids_stay_apart(kind):
    """``DataCollatorWithFlattening``'s default batch (sequences packed into one row, ``position_ids`` restarting at 0,
    no attention mask): HF's own implementations attend within each sequence. attnc attended across them (logits
    off by 0.4, gradients by more than their size); now every sequence's logits and the parameters' gradients equal
    the float64 reference's on the packed batch, and the logits equal each sequence run alone."""
    extra = {"sliding_window": 3} if kind == "mistral" else {}
    model = _model(kind, **extra)
    torch.manual_seed(7)
    seqs = [torch.randint(1, VOCAB, (n,)) for n in (5, 8, 3)]
    batch = transformers.DataCollatorWithFlattening()([{"input_ids": s.tolist()} for s in seqs])

    def run(impl):
        model.set_attn_implementation(impl)
        model.zero_grad()
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], labels=batch["labels"],
                    use_cache=False)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    ours, ours_grads = run("attnc_causal")
    want, want_grads = run("dense64")
    torch.testing.assert_close(ours, want, rtol=1e-10, atol=1e-10)
    for name, grad in want_grads.items():
        torch.testing.assert_close(ours_grads[name], grad, rtol=1e-9, atol=1e-10, msg=name)
    model.set_attn_implementation("attnc_causal")
    with torch.no_grad():
        alone = torch.cat([model(input_ids=s[None]).logits[0] for s in seqs])
    torch.testing.assert_close(ours[0], alone, rtol=1e-10, atol=1e-10)


def test_a_pattern_that_is_not_causal_stays_causal_on_a_causal_model():
    """A bidirectional pattern registered on a decoder (Llama: causal): its layers take ``k <= q`` too, as the
    model's own mask does, so a later token never changes an earlier position's logits (it did, by 0.2)."""
    hf.register("attnc_local3", "pattern local3\n  tokens seq\n  mask q - k <= 1 and k - q <= 1\n")
    model = _model("llama")
    ids, _ = _batch([9], 9, left=False)
    changed = ids.clone()
    changed[0, 6] = (changed[0, 6] % (VOCAB - 1)) + 1
    a, b = _logits(model, "attnc_local3", ids, None), _logits(model, "attnc_local3", changed, None)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=0)
    # the same as the causal window of 2 the model's mask leaves of it
    hf.register("attnc_back2", "stdlib:sliding_window", window=2)
    torch.testing.assert_close(a, _logits(model, "attnc_back2", ids, None), rtol=1e-12, atol=1e-12)


def test_what_a_layer_would_lose_is_refused_or_said():
    """Llama 4's chunked layers and GPT-OSS's attention sinks were dropped without a word (logits off by 0.5 and
    0.2): refused by name. ``output_attentions=True`` returns no weights, with a warning, as HF's sdpa."""
    import copy

    common = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                  vocab_size=VOCAB)
    torch.manual_seed(0)
    llama4 = transformers.Llama4ForCausalLM._from_config(
        transformers.Llama4TextConfig(**common, intermediate_size=32, intermediate_size_mlp=32, num_local_experts=2,
                                      num_experts_per_tok=1, attention_chunk_size=4,
                                      layer_types=["chunked_attention", "full_attention"], no_rope_layers=[1, 0]),
        attn_implementation="attnc_causal").eval()
    ids = torch.randint(1, VOCAB, (1, 9))
    with pytest.raises(attnc.SpecError, match="chunked") as err, torch.no_grad():
        llama4(input_ids=ids, use_cache=False)
    assert err.value.where == "argument mask_function"
    gpt_oss = transformers.AutoModelForCausalLM.from_config(
        copy.deepcopy(transformers.GptOssConfig(**common, intermediate_size=32, num_local_experts=2,
                                                num_experts_per_tok=1, sliding_window=4,
                                                layer_types=["sliding_attention", "full_attention"])),
        attn_implementation="attnc_causal").eval()
    with pytest.raises(attnc.SpecError, match="sinks") as err, torch.no_grad():
        gpt_oss(input_ids=ids)
    assert err.value.where == "argument s_aux"
    model = _model("llama")
    model.set_attn_implementation("attnc_causal")
    with pytest.warns(UserWarning, match="does not return attention weights"), torch.no_grad():
        out = model(ids, output_attentions=True)
    assert all(a is None for a in out.attentions or (None,))


def test_overlays_that_add_no_pair_or_every_pair_are_taken():
    """A multimodal Gemma 3 given text only (``token_type_ids`` all 0: HF ORs a blockwise overlay of no block) and a
    bidirectional Gemma 3 of full layers (HF ORs ``lambda *a: True``; the sliding kind's mask it also makes, with a
    bidirectional window no layer uses, is refused only by a layer that takes it): both run, equal to sdpa."""
    vocab = 300
    text = dict(vocab_size=vocab, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0, sliding_window=3,
                layer_types=["sliding_attention", "full_attention"])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    cfg = transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=1,
                                    image_token_index=vocab - 1, boi_token_index=vocab - 2, eoi_token_index=vocab - 3)
    torch.manual_seed(0)
    model = transformers.Gemma3ForConditionalGeneration(cfg).to(torch.float64).eval()
    ids = torch.randint(1, 200, (1, 8))
    call = dict(input_ids=ids, attention_mask=torch.ones_like(ids), token_type_ids=torch.zeros_like(ids))
    want = _logits_of(model, "sdpa", call)
    torch.testing.assert_close(_logits_of(model, "attnc_causal", call), want, rtol=1e-10, atol=1e-10)

    hf.register("attnc_both_ways", "pattern both\n  tokens seq\n  mask q - k < 1000 and k - q < 1000\n")
    bidir = transformers.Gemma3TextConfig(**{**text, "vocab_size": VOCAB, "layer_types": ["full_attention"] * 2},
                                          use_bidirectional_attention=True)
    torch.manual_seed(1)
    model = transformers.Gemma3ForCausalLM(bidir).to(torch.float64).eval()
    ids, mask = _batch([7, 5], 7, left=False)
    call = dict(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    want = _logits_of(model, "sdpa", call)
    torch.testing.assert_close(_logits_of(model, "attnc_both_ways", call)[real], want[real], rtol=1e-10, atol=1e-10)
    sliding = transformers.Gemma3TextConfig(**{**text, "vocab_size": VOCAB}, use_bidirectional_attention=True)
    model = transformers.Gemma3ForCausalLM(sliding).to(torch.float64).eval()
    with pytest.raises(attnc.SpecError, match="bidirectional_window_overlay") as err:
        _logits_of(model, "attnc_both_ways", call)
    assert err.value.where == "argument mask_function"


def _logits_of(model, impl, call):
    model.set_attn_implementation(impl)
    with torch.no_grad():
        return model(**call).logits
