"""Issue 58 items 11-13: the command line speaking its own flags, --version and --json, one query's
keys drawn on its grid, and smaller things a new user met (report() after torch.compile, the kda
note, diffusers' apply twice, the stdlib headers' citations)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cli import read_png, run  # run: no traceback, no internal error

import attnc


# ----------------------------------------------------------------- 11: rough edges
def test_show_queries_after_a_kv_cache(capsys):
    """``--n 4 --nk 12`` on a sequence: the last 4 of 12 tokens (it was refused, with a hint asking for it)."""
    code, out, err = run(
        capsys, "show", "stdlib:sliding_window", "-p", "window=3", "--n", "4", "--nk", "12"
    )
    assert code == 0 and err == ""
    title, *rows = out.splitlines()
    assert "4 queries (the last of 12 tokens, after a KV cache) x 12 keys" in title
    assert rows == ["......###...", ".......###..", "........###.", ".........###"]


@pytest.mark.parametrize(
    "command, hint", [("sim", "attnc sim --decode --nk 12 --n 4"), ("emit", "leave --nk out")]
)
def test_sim_and_emit_name_the_flag_for_a_kv_cache(capsys, command, hint):
    code, out, err = run(capsys, command, "stdlib:sliding_window", "--n", "4", "--nk", "12")
    assert code == 1 and out == ""
    assert err.startswith("argument --nk: error:") and hint in err
    assert "materialize_mask" not in err and "compiled module" not in err


def test_hints_speak_flags_not_python(capsys):
    code, out, err = run(capsys, "sim", "stdlib:neighborhood_2d", "--sizes", "height=8")
    assert code == 1 and out == ""
    assert err.splitlines() == [
        "argument --sizes: error: missing size 'width'",
        "  hint: pass --sizes width=..",
    ]
    code, _, err = run(capsys, "show", "stdlib:prefix_lm")
    assert code == 1 and "hint: pass -p prefix=.." in err and "prefix=..." not in err
    code, _, err = run(capsys, "show", "stdlib:neighborhood_2d", "--sizes", "height=0")
    assert code == 1 and err.startswith(
        "argument --sizes height: error: must be a positive int, got 0"
    )
    code, _, err = run(capsys, "sim", "stdlib:sliding_window", "--n", "64", "--hardware", "x100")
    assert code == 1 and err.startswith("argument --hardware: error:")
    code, _, err = run(capsys, "show", "stdlib:document", "--n", "4", "--input", "doc=0,1")
    assert code == 1 and err.startswith("argument --input doc: error: input 'doc' has shape [2]")


def test_input_values_are_commas_and_runs(capsys):
    code, _, err = run(capsys, "show", "stdlib:document", "--n", "4", "--input", "doc=0,0,1,x")
    assert code == 1
    assert (
        err.startswith("argument --input doc: error: expected numbers separated by commas")
        and "spaces" not in err
    )
    code, out, _ = run(capsys, "show", "stdlib:document", "--n", "4", "--input", "doc=0*2,1*2")
    assert code == 0 and out.splitlines()[1:] == [
        "#...",
        "##..",
        "..#.",
        "..##",
    ]  # causal within a document
    code, _, err = run(capsys, "show", "stdlib:document", "--n", "4", "--input", "doc=0*x")
    assert code == 1 and "VALUE*COUNT" in err


def test_a_misspelt_size_is_the_only_message(capsys):
    code, out, err = run(capsys, "show", "stdlib:neighborhood_2d", "--sizes", "heigth=8")
    assert code == 1 and out == ""  # no note about defaulted sizes before it
    assert err.splitlines() == [
        "argument --sizes: error: unknown size 'heigth'",
        "  hint: did you mean 'height'?",
    ]


def test_sim_requires_the_inputs_its_mask_reads(capsys):
    """A sample of document ids invented thousands of one-token documents and a 2,732x bound."""
    code, out, err = run(capsys, "sim", "stdlib:document", "--n", "8192")
    assert code == 1 and out == ""
    assert err.startswith(
        "argument --input doc: error: 'document' reads input 'doc' (int[n]) in its mask"
    )
    assert "--input doc=0*4096,1*4096" in err
    code, out, _ = run(
        capsys, "sim", "stdlib:document", "--n", "8192", "--input", "doc=0*4096,1*4096", "--json"
    )
    assert code == 0 and json.loads(out)["density"] == pytest.approx(0.25, abs=1e-3)
    code, _, err = run(capsys, "sim", "stdlib:longformer", "--n", "1024")
    assert code == 1 and "argument --input is_global" in err


def test_emit_arch_shows_the_kernels_recorded_offline(capsys):
    code, out, err = run(
        capsys,
        "emit",
        "stdlib:sliding_window",
        "--arch",
        "sm_90",
        "--n",
        "1024",
        "--head-dim",
        "64",
    )
    assert code == 0 and err == ""
    head = out.splitlines()[0]
    assert head.startswith(
        "# attnc emit: the Triton kernels a CUDA call of 'sliding_window' launches on sm_90"
    )
    assert "#   launch attnc_fwd: grid" in out and "#   launch attnc_bwd_dkdv" in out
    assert "@triton.jit" in out and "def attnc_fwd(" in out
    code, _, err = run(capsys, "emit", "stdlib:sliding_window", "--arch", "75")
    assert (
        code == 1
        and err.startswith("argument --arch: error: unknown architecture '75'")
        and "sm_90" in err
    )
    code, _, err = run(capsys, "emit", "stdlib:sliding_window", "--ptx")
    assert code == 1 and err.startswith("argument --ptx: error:") and "--arch" in err


def test_emit_a_recurrence_shows_its_triton_kernels(capsys):
    code, out, err = run(capsys, "emit", "stdlib:retention", "--n", "256")
    assert code == 0 and err == ""
    assert "# ---- runtime/recurrences/decay/triton.py: _state_kernel" in out
    assert "def _state_kernel(" in out and "#   launch _out_kernel: grid" in out


def test_check_refuses_an_empty_file(capsys, tmp_path):
    for text in ("", "# only a comment\n"):
        path = tmp_path / "empty.attn"
        path.write_text(text)
        code, out, err = run(capsys, "check", str(path))
        assert code == 1 and out == ""
        assert err.startswith(f"{path}:1:1: error: declares no pattern or recurrence")


def test_png_must_end_in_png(capsys, tmp_path):
    code, out, err = run(
        capsys, "show", "stdlib:sliding_window", "--n", "4", "--png", str(tmp_path / "x.jpg")
    )
    assert code == 1 and out == ""
    assert err.startswith("argument --png: error:") and "ends in .png" in err
    assert not (tmp_path / "x.jpg").exists()


def test_report_after_torch_compile():
    for spec, params in (("stdlib:sliding_window", {"window": 8}), ("stdlib:retention", {})):
        module = attnc.compile_attention(spec, backend="cpu", **params)
        compiled = torch.compile(module, fullgraph=True)
        q = torch.randn(1, 2, 64, 16)
        compiled(q, q, q)
        rep = module.report()
        assert rep.to_dict()["n"] == 64, spec


def test_the_kda_note_names_its_per_channel_kernels(capsys):
    code, out, _ = run(capsys, "sim", "stdlib:kda", "--n", "1024")
    assert code == 0
    assert "none yet" not in out and "runtime/recurrences/delta/triton_kda.py" in out


def test_diffusers_apply_twice_is_refused():
    diffusers = pytest.importorskip("diffusers")
    from attnc.integrations import diffusers as attnc_diffusers

    model = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=8,
        freq_dim=8,
        ffn_dim=16,
        num_layers=2,
        cross_attn_norm=True,
        rope_max_seq_len=32,
    )
    handle = attnc_diffusers.apply(model, "stdlib:neighborhood_3d", kernel_size=(1, 3, 3))
    installed = {n: m.processor for n, m in attnc_diffusers._self_attentions(model).items()}
    with pytest.raises(attnc.SpecError, match="already runs an attnc pattern") as err:
        attnc_diffusers.apply(model, "stdlib:neighborhood_3d", kernel_size=(1, 5, 5))
    assert "remove()" in err.value.hint
    assert {n: m.processor for n, m in attnc_diffusers._self_attentions(model).items()} == installed
    handle.remove()
    attnc_diffusers.apply(model, "stdlib:neighborhood_3d", kernel_size=(1, 5, 5)).remove()


# ----------------------------------------------------------------- 12: --version, --json, the query picture
def test_version(capsys):
    code, out, err = run(capsys, "--version")
    assert code == 0 and err == "" and out == f"attnc {attnc.__version__}\n"


def test_list_json(capsys):
    code, out, _ = run(capsys, "list", "--json")
    data = json.loads(out)
    sw = next(p for p in data["patterns"] if p["name"] == "sliding_window")
    assert code == 0 and sw["kind"] == "pattern" and sw["summary"].endswith(".")
    assert {"name": "window", "default": 4096} in sw["params"] or any(
        p["name"] == "window" for p in sw["params"]
    )
    code, out, _ = run(capsys, "list", "--json", "dsa")
    (dsa,) = json.loads(out)["patterns"]
    assert dsa["name"] == "dsa" and "route topk(topk)" in dsa["source"]


def test_check_json(capsys, tmp_path):
    bad = tmp_path / "bad.attn"
    bad.write_text("pattern p(window = 4)\n  tokens seq\n  mask causl and q - k < windw\n")
    code, out, err = run(capsys, "check", "--json", "stdlib:document", str(bad))
    assert code == 1 and err == ""
    ok, failed = json.loads(out)["files"]
    assert ok == {
        "file": "stdlib:document",
        "ok": True,
        "declarations": [{"name": "document", "kind": "pattern"}],
        "warnings": [],
        "errors": [],
    }
    assert failed["ok"] is False
    assert [(e["line"], e["col"], e["message"]) for e in failed["errors"]] == [
        (3, 8, "unknown name 'causl'"),
        (3, 26, "unknown name 'windw'"),
    ]


def test_show_json(capsys):
    code, out, _ = run(capsys, "show", "--json", "stdlib:sliding_window", "-p", "window=2")
    data = json.loads(out)
    assert (
        code == 0
        and data["n"] == data["nk"] == 32
        and data["notes"] == ["no --n: showing 32 tokens"]
    )
    assert data["heads"][0]["mask"][3] == [0, 0, 1, 1] + [0] * 28
    code, out, _ = run(capsys, "show", "--json", "stdlib:sliding_window", "-p", "window=3", "--n", "6")
    assert json.loads(out)["heads"][0]["density"] == 15 / 36  # in float64 (it was a float32's 0.41666665...)
    code, out, _ = run(capsys, "show", "--json", "stdlib:retention")
    data = json.loads(out)
    assert (
        data["kind"] == "recurrence" and len(data["heads"]) == 4 and "log_decay" in data["heads"][0]
    )
    code, out, _ = run(
        capsys, "show", "--json", "stdlib:neighborhood_2d", "--sizes", "height=8,width=8", "--tiles"
    )
    data = json.loads(out)
    assert data["kind"] == "tiles" and data["q_tiles"] == data["kv_tiles"] == 16
    assert (
        data["full"] + data["partial"] + data["empty"] == 16 * 16 and len(data["classes"][0]) == 16
    )


def test_sim_json_is_one_document(capsys):
    code, out, err = run(capsys, "sim", "--json", "stdlib:sliding_window", "--n", "2048")
    assert code == 0 and json.loads(out)["n"] == 2048


def test_show_query_on_a_2d_grid(capsys):
    code, out, err = run(
        capsys,
        "show",
        "stdlib:neighborhood_2d",
        "--sizes",
        "height=8,width=8",
        "-p",
        "kernel_size=3",
        "--query",
        "5,7",
    )
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("neighborhood_2d: the query at (y=5, x=7) attends 9 of 64 keys")
    assert lines[1] == "y 01234567  x"
    # NATTEN's window at the border: shifted inside the grid (columns 5..7, rows 4..6)
    assert lines[2:] == [
        "0 ........",
        "1 ........",
        "2 ........",
        "3 ........",
        "4 .....###",
        "5 .....##Q",
        "6 .....###",
        "7 ........",
    ]
    code, _, err = run(
        capsys, "show", "stdlib:neighborhood_2d", "--sizes", "height=8,width=8", "--query", "5"
    )
    assert code == 1 and err.startswith(
        "argument --query: error: expected 2 coordinates (y, x), got 1"
    )
    code, _, err = run(
        capsys, "show", "stdlib:neighborhood_2d", "--sizes", "height=8,width=8", "--query", "5,8"
    )
    assert code == 1 and err.startswith("argument --query: error: x=8 is outside the grid")


def test_show_query_png_draws_slices_axes_and_a_legend(capsys, tmp_path):
    png = tmp_path / "q.png"
    code, out, _ = run(
        capsys,
        "show",
        "stdlib:neighborhood_3d",
        "--sizes",
        "frames=3,height=6,width=6",
        "-p",
        "kernel_size=3",
        "--query",
        "1,2,3",
        "--png",
        str(png),
    )
    assert code == 0 and out.startswith(
        f"wrote {png}: neighborhood_3d: the query at (t=1, y=2, x=3)"
    )
    width, height, rows = read_png(png)

    def colours(y0, y1, x0, x1):
        return {tuple(rows[y][3 * x : 3 * x + 3]) for y in range(y0, y1) for x in range(x0, x1)}

    every = colours(0, height, 0, width)
    assert (220, 30, 30) in every  # the query's outline
    assert (30, 30, 120) in every and (235, 235, 235) in every  # keys attended, and not
    assert (0, 0, 0) in every  # axis labels, captions and the legend's words
    # three panels side by side: the attended blue appears in three separate column ranges
    blue_columns = sorted(
        {
            x
            for y in range(height)
            for x in range(width)
            if tuple(rows[y][3 * x : 3 * x + 3]) == (30, 30, 120)
        }
    )
    runs = 1 + sum(1 for a, b in zip(blue_columns, blue_columns[1:], strict=False) if b > a + 1)
    assert runs >= 3
    data = json.loads(
        run(
            capsys,
            "show",
            "--json",
            "stdlib:neighborhood_3d",
            "--sizes",
            "frames=3,height=6,width=6",
            "-p",
            "kernel_size=3",
            "--query",
            "1,2,3",
        )[1]
    )
    assert (
        data["kind"] == "query"
        and data["query"] == {"t": 1, "y": 2, "x": 3}
        and data["heads"][0]["keys"] == 27
    )


# ----------------------------------------------------------------- 13: headers against the authors' code
def _header(name: str) -> str:
    return (Path(attnc.__file__).parent / "stdlib_patterns" / f"{name}.attn").read_text()


def test_headers_cite_the_code_they_follow():
    halo = _header("halo_2d")
    assert "20210d57" not in halo and "ff0eb71" in halo
    assert "keeps the padding" in halo and "this follows the masked code" not in halo
    routing = _header("routing_transformer")
    assert "3f6c461" in routing and "compares the tokens' positions" in routing
    assert "float64 when q or k is float64" in _header("vmoba")


def test_a_query_coordinate_with_a_minus_reaches_the_check(capsys):
    """``--query -1,2``: argparse took the value for a flag ("expected one argument"); it is the coordinate's check
    that answers, naming the axis."""
    code, _, err = run(capsys, "show", "stdlib:neighborhood_2d", "--sizes", "height=8,width=8", "-p", "kernel_size=3",
                       "--query", "-1,2")
    assert code == 1 and "y=-1 is outside the grid" in err and "expected one argument" not in err


@pytest.mark.parametrize("argv, flag", [
    (["show", "stdlib:neighborhood_2d", "--sizes", "height=100000,width=100000", "-p", "kernel_size=7", "--tiles"],
     "--sizes"),
    (["show", "stdlib:sliding_window", "--n", "100000000", "-p", "window=3", "--tiles"], "--n"),
    (["check-gpu", "stdlib:sliding_window", "--n", "1099511627776", "--arch", "90"], "--n"),
    (["check-gpu", "stdlib:neighborhood_2d", "--sizes", "height=3000,width=3000", "--arch", "90"], "--sizes"),
])
def test_sizes_too_large_to_plan_are_refused_naming_the_flag(capsys, argv, flag):
    # the tile lists were allocated first: "internal error: RuntimeError: ... can't allocate 775241596928 bytes"
    code, out, err = run(capsys, *argv)
    assert code == 1 and out == ""
    assert err.startswith(f"argument {flag}: error:") and "too" in err and "internal error" not in err


def test_an_empty_file_or_png_name_is_named_as_the_argument(capsys, tmp_path):
    # they were located at the empty name: ": error: no such file: " and "argument --png: error: : --png ..."
    code, out, err = run(capsys, "check", "")
    assert code == 1 and err.startswith("argument FILE: error: an empty FILE")
    code, out, err = run(capsys, "show", "stdlib:sliding_window", "--png", "")
    assert code == 1 and err.startswith("argument --png: error: --png takes the path") and "e.g. --png mask.png" in err
