"""attnc.integrations.diffusers: a tiny random Wan transformer (built offline from a config) with
attnc's 3-D patterns equals diffusers' own processor given the same mask, materialised."""

import pytest
import torch

import attnc
from attnc.integrations import diffusers as attnc_diffusers

diffusers = pytest.importorskip("diffusers")
from diffusers.models.transformers.transformer_wan import WanAttnProcessor  # noqa: E402

LATENT = (2, 4, 3, 8, 6)  # [B, C, F, H, W]; patch (1, 2, 2) -> grid 3 x 4 x 3 = 36 tokens
GRID = {"frames": 3, "height": 4, "width": 3}


def _model() -> "diffusers.WanTransformer3DModel":
    torch.manual_seed(0)
    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
        text_dim=8, freq_dim=8, ffn_dim=16, num_layers=2, cross_attn_norm=True, rope_max_seq_len=32)
    # the zero-initialised output projections would hide the attention: randomise every parameter
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.to(torch.float64).eval()


def _inputs():
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(LATENT, generator=g, dtype=torch.float64)
    text = torch.randn(LATENT[0], 5, 8, generator=g, dtype=torch.float64)
    return latent, torch.tensor([3, 500]), text


class _Masked(WanAttnProcessor):
    """diffusers' own processor with a fixed boolean mask (True = attend) on self-attention."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def _run(model):
    latent, t, text = _inputs()
    with torch.no_grad():
        return model(latent, t, text, return_dict=False)[0]


def _with_mask(model, mask):
    for m in attnc_diffusers._self_attentions(model).values():
        m.set_processor(_Masked(mask))
    return _run(model)


@pytest.mark.parametrize("params", [
    {"kernel_size": (2, 3, 3)},
    {"kernel_size": (2, 2, 2), "dilation": (1, 2, 1), "stride": (1, 1, 2), "is_causal": (True, False, False)},
])
def test_window_equals_default_processor_with_the_materialised_mask(params):
    model = _model()
    mask = attnc.materialize_mask("stdlib:neighborhood_3d", sizes=GRID, **params)[0]
    assert not mask.all()  # a real window, not everything
    full = _run(model)
    expected = _with_mask(model, mask)
    assert not torch.allclose(full, expected)  # the window changes the output
    installed = attnc_diffusers.apply(model, "stdlib:neighborhood_3d", **params)
    got = _run(model)
    assert all(p.grid == (3, 4, 3) for p in installed.processors.values())
    assert len(installed.processors) == 2
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)
    installed.remove()  # back to the processors it replaced (here the masked ones)
    assert all(isinstance(m.processor, _Masked) for m in attnc_diffusers._self_attentions(model).values())


def test_covering_window_equals_default_processor_without_mask():
    model = _model()
    expected = _run(model)
    installed = attnc_diffusers.apply(model, "stdlib:neighborhood_3d", kernel_size=(3, 4, 3), backend="reference")
    torch.testing.assert_close(_run(model), expected, rtol=1e-10, atol=1e-10)
    installed.remove()
    assert all(type(m.processor) is WanAttnProcessor for m in attnc_diffusers._self_attentions(model).values())
    torch.testing.assert_close(_run(model), expected, rtol=0, atol=0)


def test_grid_follows_the_latent():
    """A second call with another latent shape re-reads the grid (frames 2, height 2, width 4)."""
    model = _model()
    installed = attnc_diffusers.apply(model, "stdlib:neighborhood_3d", kernel_size=2)
    latent = torch.randn(1, 4, 2, 4, 8, dtype=torch.float64)
    text = torch.randn(1, 5, 8, dtype=torch.float64)
    with torch.no_grad():
        got = model(latent, torch.tensor([7]), text, return_dict=False)[0]
    assert all(p.grid == (2, 2, 4) for p in installed.processors.values())
    mask = attnc.materialize_mask("stdlib:neighborhood_3d", sizes={"frames": 2, "height": 2, "width": 4},
                                  kernel_size=2)[0]
    installed.remove()
    for m in attnc_diffusers._self_attentions(model).values():
        m.set_processor(_Masked(mask))
    with torch.no_grad():
        expected = model(latent, torch.tensor([7]), text, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_bad_arguments_are_refused():
    model = _model()
    with pytest.raises(attnc.SpecError) as err:
        attnc_diffusers.apply(torch.nn.Linear(2, 2))
    assert err.value.where == "argument transformer"
    with pytest.raises(attnc.SpecError) as err:
        attnc_diffusers.apply(model, "stdlib:neighborhood_2d")
    assert err.value.where == "argument pattern"
    with pytest.raises(attnc.SpecError) as err:
        attnc_diffusers.apply(model, backend="nope")
    assert err.value.where == "argument backend"
    # a window larger than the latent's grid: refused in the caller's terms at the call
    attnc_diffusers.apply(model, "stdlib:neighborhood_3d", kernel_size=(4, 2, 2))
    with pytest.raises(attnc.SpecError):
        _run(model)
    # the processor used without the transformer's hook does not guess the grid
    attn = next(iter(attnc_diffusers._self_attentions(model).values()))
    attn.processor.grid = None
    with pytest.raises(attnc.SpecError) as err:
        attn(torch.randn(1, 36, 24, dtype=torch.float64), None, None, None)
    assert err.value.where == "argument hidden_states"


# ----------------------------------------------------------------- CogVideoX: text + video tokens
TEXT = 5


def _cog_model(frames: int = 3) -> "diffusers.CogVideoXTransformer3DModel":
    """A tiny random CogVideoX for latents of ``frames`` frames (its video encoder compresses time 4x)."""
    torch.manual_seed(0)
    model = diffusers.CogVideoXTransformer3DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=8, num_layers=2, sample_width=6, sample_height=8, sample_frames=4 * (frames - 1) + 1,
        patch_size=2, max_text_seq_length=TEXT)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model.to(torch.float64).eval()


def _cog_run(model, frames: int = 3):
    g = torch.Generator().manual_seed(2)
    latent = torch.randn(2, frames, 4, 8, 6, generator=g, dtype=torch.float64)  # [B, F, C, H, W]: grid F x 4 x 3
    text = torch.randn(2, TEXT, 8, generator=g, dtype=torch.float64)
    n = frames * 12
    rotary = (torch.randn(n, 8, generator=g, dtype=torch.float64), torch.randn(n, 8, generator=g, dtype=torch.float64))
    with torch.no_grad():
        return model(latent, text, torch.tensor([3, 500]), image_rotary_emb=rotary, return_dict=False)[0]


class _CogMasked(diffusers.models.attention_processor.CogVideoXAttnProcessor2_0):
    """diffusers' own CogVideoX processor with a fixed boolean [B, text + video, text + video] mask."""

    def __init__(self, mask):
        super().__init__()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states, attention_mask=None, image_rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, image_rotary_emb)


def _joint_mask(**params):
    """Text rows and columns attend everything; video rows x video columns are the 3-D neighborhood."""
    video = attnc.materialize_mask("stdlib:neighborhood_3d", sizes=GRID, **params)[0]
    mask = torch.ones(TEXT + 36, TEXT + 36, dtype=torch.bool)
    mask[TEXT:, TEXT:] = video
    return mask.expand(2, -1, -1)


@pytest.mark.parametrize("params", [
    {"kernel_size": (2, 3, 3)},
    {"kernel_size": (2, 2, 2), "dilation": (1, 2, 1), "stride": (1, 1, 2), "is_causal": (True, False, False)},
])
def test_cogvideox_window_equals_default_processor_with_the_materialised_mask(params):
    model = _cog_model()
    full = _cog_run(model)
    modules = attnc_diffusers._cogvideox_attentions(model)
    assert len(modules) == 2
    for m in modules.values():
        m.set_processor(_CogMasked(_joint_mask(**params)))
    expected = _cog_run(model)
    assert not torch.allclose(full, expected)  # the window changes the output
    installed = attnc_diffusers.apply(model, "stdlib:neighborhood_3d", **params)
    got = _cog_run(model)
    assert all(p.grid == (3, 4, 3) for p in installed.processors.values())
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_cogvideox_covering_window_equals_default_processor_without_mask():
    model = _cog_model()
    expected = _cog_run(model)
    installed = attnc_diffusers.apply(model, kernel_size=(3, 4, 3), backend="reference")
    torch.testing.assert_close(_cog_run(model), expected, rtol=1e-10, atol=1e-10)
    installed.remove()
    torch.testing.assert_close(_cog_run(model), expected, rtol=0, atol=0)


def test_cogvideox_bad_arguments_are_refused():
    model = _cog_model()
    with pytest.raises(attnc.SpecError) as err:
        attnc_diffusers.apply(model, "stdlib:neighborhood_2d")
    assert err.value.where == "argument pattern"
    with pytest.raises(attnc.SpecError) as err:
        attnc_diffusers.apply(model, kernel_size_t=3)
    assert err.value.where == "argument kernel_size_t"
    for bad, where in (({"kernel_size": (2, 3, 1)}, "argument kernel_size"),
                       ({"kernel_size": 3, "stride": 0}, "argument stride"),
                       ({"kernel_size": 3, "is_causal": 1}, "argument is_causal")):
        with pytest.raises(attnc.SpecError) as err:  # at apply(), not at the first forward
            attnc_diffusers.apply(model, **bad)
        assert err.value.where == where, str(err.value)


#: The joint text + video attention as one spec (the language's concatenated layout): text tokens attend
#: everything and are attended by everything, video tokens a 3-D neighborhood of video tokens.
JOINT = """pattern joint(kernel_size_t = 3, kernel_size_y = 3, kernel_size_x = 3, stride_t = 1, stride_y = 1,
                     stride_x = 1, dilation_t = 1, dilation_y = 1, dilation_x = 1, is_causal_t = false,
                     is_causal_y = false, is_causal_x = false)
  tokens seq(text) + grid(t: frames, y: height, x: width)
  mask q in text or k in text or neighborhood_3d(kernel_size_t = kernel_size_t, kernel_size_y = kernel_size_y,
    kernel_size_x = kernel_size_x, stride_t = stride_t, stride_y = stride_y, stride_x = stride_x,
    dilation_t = dilation_t, dilation_y = dilation_y, dilation_x = dilation_x, is_causal_t = is_causal_t,
    is_causal_y = is_causal_y, is_causal_x = is_causal_x)
"""


@pytest.mark.parametrize("params", [
    {"kernel_size": (2, 3, 3)},
    {"kernel_size": (2, 2, 2), "dilation": (1, 2, 1), "stride": (1, 1, 2), "is_causal": (True, False, False)},
])
def test_cogvideox_one_spec_equals_na3d_with_additional_keys(params):
    model = _cog_model()
    for m in attnc_diffusers._cogvideox_attentions(model).values():
        m.set_processor(_CogMasked(_joint_mask(**params)))
    expected = _cog_run(model)
    na3d_form = attnc_diffusers.apply(model, "stdlib:neighborhood_3d", **params)
    by_na3d = _cog_run(model)
    na3d_form.remove()
    installed = attnc_diffusers.apply(model, JOINT, backend="cpu", **params)
    by_spec = _cog_run(model)
    assert installed.attention is not None
    assert all(p.attention is installed.attention and p.grid == (3, 4, 3) for p in installed.processors.values())
    torch.testing.assert_close(by_spec, by_na3d, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(by_spec, expected, rtol=1e-10, atol=1e-10)
    installed.remove()
    assert all(isinstance(m.processor, _CogMasked) for m in attnc_diffusers._cogvideox_attentions(model).values())


def test_cogvideox_joint_spec_must_put_the_text_first():
    model = _cog_model()
    with pytest.raises(attnc.SpecError) as err:
        attnc_diffusers.apply(model, JOINT.replace("seq(text) + grid(t: frames, y: height, x: width)",
                                                   "grid(t: frames, y: height, x: width) + seq(text)"))
    assert err.value.where == "argument pattern" and "text first" in err.value.hint
    with pytest.raises(attnc.SpecError) as err:  # and the Wan integration wants a plain grid
        attnc_diffusers.apply(_model(), JOINT)
    assert err.value.where == "argument pattern"
