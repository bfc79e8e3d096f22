"""The ``attnc`` command: exit codes, output, clean errors (never a traceback)."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

import attnc
from attnc import cli

OK_SPEC = "# A local causal band.\npattern local(w = 3)\n  tokens seq\n  mask causal and q - k < w\n"
BAD_SPEC = "pattern p\n  tokens seq\n  mask q < < k\n"
GRID_SPEC = "pattern g(r = 1)\n  tokens grid(y: height, x: width)\n  mask abs(q.y - k.y) <= r and q.x == k.x\n"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "internal error" not in out + err
    return code, out, err


@pytest.fixture
def files(tmp_path):
    paths = {}
    for name, text in (("ok.attn", OK_SPEC), ("bad.attn", BAD_SPEC), ("grid.attn", GRID_SPEC)):
        paths[name] = tmp_path / name
        paths[name].write_text(text)
    paths["garbage.attn"] = tmp_path / "garbage.attn"
    paths["garbage.attn"].write_bytes(bytes(range(256)) * 3)
    paths["latin.attn"] = tmp_path / "latin.attn"
    paths["latin.attn"].write_bytes(b"pattern p\n  tokens seq\n  mask q \xe9< k\n")
    paths["dir"] = tmp_path / "adir.attn"
    paths["dir"].mkdir()
    return paths


def band(n: int, w: int) -> list[str]:
    return ["".join("#" if k <= q and q - k < w else "." for k in range(n)) for q in range(n)]


# ----------------------------------------------------------------- list
def test_list(capsys):
    code, out, err = run(capsys, "list")
    assert code == 0 and err == ""
    lines = out.splitlines()
    names = [line.split()[0] for line in lines]
    assert "sliding_window" in names and names == sorted(names)
    sw = next(line for line in lines if line.startswith("sliding_window "))
    assert "pattern" in sw and "window=" in sw


def test_list_names_show_each_pattern_in_full(capsys):
    code, out, err = run(capsys, "list", "dsa", "stdlib:quest")
    assert code == 0 and err == ""
    text = (Path(attnc.__file__).parent / "stdlib_patterns" / "dsa.attn").read_text()
    assert out.startswith(text.rstrip())  # the whole file: header, declaration, clauses
    assert "pattern quest(" in out and "# Quest:" in out and "route topk(topk)" in out
    code, out, err = run(capsys, "list", "mobba")
    assert code == 1 and out == "" and "no stdlib pattern 'mobba'" in err and "did you mean 'moba'" in err


def test_show_pools_a_large_mask_into_a_readable_drawing(capsys):
    code, out, err = run(capsys, "show", "stdlib:sliding_window", "-p", "window=700", "--n", "3000")
    assert code == 0 and err == ""
    title, *rows = out.splitlines()
    assert "each character 19 x 19 pairs" in title
    assert len(rows) == 158 and all(len(r) == 158 for r in rows)  # ceil(3000 / 19) a side
    # the first pooled row: a causal corner (+), then nothing; a row well inside: full cells before the diagonal
    assert rows[0][0] == "+" and set(rows[0][1:]) == {"."}
    # queries 1900..1918 reach keys 1201..1918: cells 63-64 in part, 65-99 whole, 100 the causal corner
    assert rows[100] == "." * 63 + "++" + "#" * 35 + "+" + "." * 57
    code, small, _ = run(capsys, "show", "stdlib:sliding_window", "-p", "window=3", "--n", "5")
    assert small.splitlines()[1:] == ["#....", "##...", "###..", ".###.", "..###"]  # one pair a character


# ----------------------------------------------------------------- check
def test_check_ok(capsys, files):
    code, out, err = run(capsys, "check", str(files["ok.attn"]))
    assert code == 0 and err == ""
    assert out.strip() == f"{files['ok.attn']}: ok (1 declaration: local)"


def test_check_bad_file(capsys, files):
    code, out, err = run(capsys, "check", str(files["bad.attn"]))
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith(f"{files['bad.attn']}:3:12: error: unexpected '<'")
    assert lines[1] == "      mask q < < k" and lines[2] == "               ^"


def test_check_several_files(capsys, files):
    code, out, err = run(capsys, "check", str(files["ok.attn"]), str(files["bad.attn"]), str(files["grid.attn"]))
    assert code == 1
    assert f"{files['ok.attn']}: ok" in out and f"{files['grid.attn']}: ok" in out
    assert f"{files['bad.attn']}:3:12: error:" in err


def test_check_semantic_error(capsys, tmp_path):
    path = tmp_path / "sem.attn"
    path.write_text("pattern p(window = 3)\n  tokens seq\n  mask q - k < windw\n")
    code, _, err = run(capsys, "check", str(path))
    assert code == 1
    assert err.splitlines()[0] == f"{path}:3:16: error: unknown name 'windw'"
    assert "hint: did you mean 'window'?" in err


def test_check_stdlib(capsys):
    code, out, _ = run(capsys, "check", "stdlib:sliding_window")
    assert code == 0 and "ok" in out


def test_check_nonexistent_file(capsys, tmp_path):
    missing = tmp_path / "nope.attn"
    code, out, err = run(capsys, "check", str(missing))
    assert code == 1 and out == ""
    assert "no such file" in err and str(missing) in err


def test_check_directory(capsys, files):
    code, _, err = run(capsys, "check", str(files["dir"]))
    assert code == 1 and "is a directory" in err


def test_check_binary_garbage(capsys, files):
    code, out, err = run(capsys, "check", str(files["garbage.attn"]))
    assert code == 1 and out == ""
    # bytes 0..127 are valid UTF-8: the first bad byte is 0x80; \n (0x0a) and a lone \r (0x0d) end lines
    data = files["garbage.attn"].read_bytes()[:128].replace(b"\r\n", b"\n").replace(b"\r", b"\n")
    line = data.count(b"\n") + 1
    col = len(data) - (data.rfind(b"\n") + 1) + 1
    assert err.splitlines()[0] == f"{files['garbage.attn']}:{line}:{col}: error: file is not UTF-8 text"


def test_check_non_utf8_file(capsys, files):
    code, _, err = run(capsys, "check", str(files["latin.attn"]))
    assert code == 1
    assert err.startswith(f"{files['latin.attn']}:3:10: error: file is not UTF-8 text")


# ----------------------------------------------------------------- show
def test_show_prints_the_mask(capsys, files):
    code, out, err = run(capsys, "show", str(files["ok.attn"]), "--n", "6")
    assert code == 0 and err == ""
    lines = out.splitlines()
    assert lines[0].startswith("local:") and "6 queries x 6 keys" in lines[0]
    assert lines[1:7] == band(6, 3)


def test_show_with_params(capsys, files):
    code, out, _ = run(capsys, "show", str(files["ok.attn"]), "-p", "w=2", "--n", "5")
    assert code == 0 and out.splitlines()[1:6] == band(5, 2)
    code, out, _ = run(capsys, "show", "stdlib:sliding_window", "--n", "7", "-p", "window=4")
    assert code == 0 and out.splitlines()[1:8] == band(7, 4)


def test_show_grid_with_sizes(capsys, files):
    code, out, _ = run(capsys, "show", str(files["grid.attn"]), "--sizes", "height=3,width=2", "-p", "r=0")
    assert code == 0
    rows = out.splitlines()[1:7]
    coords = [(y, x) for y in range(3) for x in range(2)]
    assert rows == ["".join("#" if a == b else "." for b in coords) for a in coords]


def read_png(path) -> tuple[int, int, list[bytes]]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos:pos + 4])
        kind, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length:pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        chunks.append((kind, body))
        pos += 12 + length
    assert chunks[0][0] == b"IHDR" and chunks[-1][0] == b"IEND"
    width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, interlace) == (8, 2, 0)  # 8-bit RGB
    raw = zlib.decompress(b"".join(body for kind, body in chunks if kind == b"IDAT"))
    stride = 1 + 3 * width
    assert len(raw) == stride * height
    rows = [raw[i * stride:(i + 1) * stride] for i in range(height)]
    assert all(r[0] == 0 for r in rows)  # filter type None
    return width, height, [r[1:] for r in rows]


def test_show_png(capsys, files, tmp_path):
    png = tmp_path / "mask.png"
    code, out, _ = run(capsys, "show", str(files["ok.attn"]), "--n", "6", "--png", str(png))
    assert code == 0 and f"wrote {png}" in out
    width, height, rows = read_png(png)
    assert width == height and width % 6 == 0 and width >= 6
    scale = width // 6
    expected = band(6, 3)
    for q in range(6):
        for k in range(6):
            y, x = q * scale + scale // 2, k * scale + scale // 2
            r, g, b = rows[y][3 * x:3 * x + 3]
            dark = r + g + b < 384
            assert dark == (expected[q][k] == "#"), (q, k, (r, g, b))


def test_show_png_unwritable(capsys, files, tmp_path):
    code, _, err = run(capsys, "show", str(files["ok.attn"]), "--png", str(tmp_path / "no" / "dir" / "m.png"))
    assert code == 1 and "cannot write" in err


@pytest.mark.parametrize("args, fragment", [
    (["-p", "w"], "expected NAME=VALUE, got 'w'"),
    (["-p", "w=abc"], "expected a number or true/false, got 'abc'"),
    (["-p", "nosuch=1"], "'local' has no parameter 'nosuch'"),
    (["-p", "w=1.5"], "expected int"),
    (["-p", "w=true"], "expected int"),
    (["--n", "0"], "must be a positive int, got 0"),
    (["--n", "x"], "invalid int value: 'x'"),
    (["--heads", "-2"], "must be a positive int"),
    (["--sizes", "a=3"], "unknown size 'a'"),
    (["--name", "other"], "declares no 'other'"),
])
def test_show_bad_arguments(capsys, files, args, fragment):
    code, out, err = run(capsys, "show", str(files["ok.attn"]), *args)
    assert code == 1
    assert fragment in err, err
    assert len(err.strip().splitlines()) <= 3  # one clear message (+ hint)


@pytest.mark.parametrize("sizes, fragment", [
    ("height=x", "expected a number or true/false, got 'x'"),
    ("height=1.5", "expected an int"),
    ("height=0", "must be a positive int"),
    ("height", "expected NAME=VALUE"),
    ("depth=3", "unknown size 'depth'"),
])
def test_show_bad_sizes(capsys, files, sizes, fragment):
    code, _, err = run(capsys, "show", str(files["grid.attn"]), "--sizes", sizes)
    assert code == 1 and fragment in err, err


def test_show_bad_spec_and_missing_file(capsys, files, tmp_path):
    code, _, err = run(capsys, "show", str(files["bad.attn"]))
    assert code == 1 and f"{files['bad.attn']}:3:12: error:" in err
    code, _, err = run(capsys, "show", str(tmp_path / "missing.attn"))
    assert code == 1 and "no such file" in err
    code, _, err = run(capsys, "show", "stdlib:no_such_pattern")
    assert code == 1 and "no stdlib pattern 'no_such_pattern'" in err


def test_show_window_too_large(capsys, tmp_path):
    path = tmp_path / "w.attn"
    path.write_text("pattern p\n  tokens seq\n  mask window(9)\n")
    code, _, err = run(capsys, "show", str(path), "--n", "8")
    assert code == 1
    assert err.splitlines()[0] == f"{path}:3:8: error: window of 9 does not fit the sequence of length 8"


# ----------------------------------------------------------------- usage errors
def test_unknown_subcommand(capsys):
    code, out, err = run(capsys, "frobnicate")
    assert code == 1 and "invalid choice: 'frobnicate'" in err


def test_no_subcommand_and_missing_arguments(capsys, files):
    code, out, _ = run(capsys)
    assert code == 1 and "usage" in out.lower()
    code, _, err = run(capsys, "check")
    assert code == 1 and "required" in err
    code, _, err = run(capsys, "show", "--bogus-flag")
    assert code == 1 and "required" in err
    code, _, err = run(capsys, "show", str(files["ok.attn"]), "--bogus-flag")
    assert code == 1 and "unrecognized arguments: --bogus-flag" in err


def test_never_a_traceback(capsys, files, tmp_path):
    weird = tmp_path / "weird.attn"
    weird.write_text("pattern p tokens seq mask " + "(" * 3000 + "q" + ")" * 3000 + " < 2 ** 10**9")
    deep = tmp_path / "deep.attn"
    deep.write_text("pattern p tokens seq mask " + "not " * 5000 + "causal")
    for argv in (["check", str(weird)], ["check", str(deep)], ["show", str(weird)], ["show", str(deep)],
                 ["show", str(files["garbage.attn"])], ["show", str(files["dir"])],
                 ["check", ""], ["show", ""], ["show", str(files["ok.attn"]), "--n", "100000"]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and "error" in err, (argv, err)


# ----------------------------------------------------------------- the installed command
def test_installed_console_command(files):
    exe = shutil.which("attnc")
    assert exe is not None, "the attnc console script is not installed"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    ok = subprocess.run([exe, "check", str(files["ok.attn"])], capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0 and "ok (1 declaration: local)" in ok.stdout
    bad = subprocess.run([exe, "check", str(files["bad.attn"])], capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith(f"{files['bad.attn']}:3:12: error: ")
    mod = subprocess.run([sys.executable, "-m", "attnc.cli", "show", str(files["ok.attn"]), "--n", "4"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert mod.returncode == 0 and mod.stdout.splitlines()[1:5] == band(4, 3)


# ----------------------------------------------------------------- issue 9: files, cache, --gpu
@pytest.mark.parametrize("kind", ["fifo", "dev_zero", "sparse_huge"])
def test_check_refuses_non_regular_and_huge_files_at_once(capsys, tmp_path, kind):
    """A FIFO used to block forever, /dev/zero and a 3 GB file to exhaust memory."""
    import signal

    if kind == "fifo":
        path = tmp_path / "pipe.attn"
        os.mkfifo(path)
        fragment = "not a regular file"
    elif kind == "dev_zero":
        path = "/dev/zero"
        fragment = "not a regular file"
    else:
        path = tmp_path / "huge.attn"
        with open(path, "wb") as f:
            f.truncate(3 * 2**30)  # sparse: no disk used
        fragment = "too large (3221225472 bytes"

    def hang(*_):
        raise TimeoutError("reading the spec file hung")

    old = signal.signal(signal.SIGALRM, hang)
    signal.alarm(30)
    try:
        for command in (["check", str(path)], ["show", str(path)]):
            code, out, err = run(capsys, *command)
            assert code == 1 and out == ""
            assert fragment in err and str(path) in err
            assert len(err.strip().splitlines()) == 1
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_load_refuses_a_fifo(tmp_path):
    import attnc

    path = tmp_path / "pipe.attn"
    os.mkfifo(path)
    with pytest.raises(attnc.SpecError, match="not a regular file"):
        attnc.load(path)


def _write_entry(directory, digest: str, data) -> None:
    import json

    (directory / f"{digest}.json").write_text(json.dumps(data))


def test_cache_ls_lists_malformed_entries_without_escape_codes(capsys, tmp_path, monkeypatch):
    kernels = tmp_path / "kernels"
    kernels.mkdir()
    _write_entry(kernels, "0" * 32, {"format": 1, "key": {"bucket": {"axes": "zz"}, "dtype": "\x1b[31mRED"},
                                     "pattern": "\x1b[2Jevil\x07", "config": {"q_tile": 5}})
    _write_entry(kernels, "1" * 32, [1, 2])
    _write_entry(kernels, "2" * 32, {"format": 1, "key": {"bucket": {"heads": "\x1b]0;title\x07"}},
                                     "config": {"q_tile": [1], "kv_tile": [1], "layout": "\x1b[1m",
                                                "num_warps": 1, "num_stages": 1}})
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path))
    code, out, err = run(capsys, "cache", "ls")
    assert code == 0 and err == ""
    assert "3 entries" in out
    rows = [line for line in out.splitlines() if line[:1] in "012"]
    assert len(rows) == 3 and all("invalid" in r for r in rows)
    assert not any(ord(c) < 32 and c != "\n" for c in out), repr(out)
    assert "?[2Jevil?" in out


def test_cache_dir_of_an_unknown_user(capsys, monkeypatch):
    monkeypatch.setenv("ATTNC_CACHE_DIR", "~nosuchuser_attnc/x")
    code, out, err = run(capsys, "cache", "ls")
    assert code == 1 and out == ""
    assert err.startswith("ATTNC_CACHE_DIR: error: cannot expand '~nosuchuser_attnc/x'")


def test_emit_gpu_is_refused_for_arch(capsys, files):
    """``--gpu`` names a GPU model elsewhere (sim); emit takes an architecture and says so."""
    for argv in (["--gpu"], ["--gpu", "h100"]):
        code, out, err = run(capsys, "emit", str(files["ok.attn"]), *argv)
        assert code == 1 and out == ""
        assert err.startswith("argument --gpu: error: emit takes the architecture") and "--arch 90" in err


@pytest.mark.parametrize("name,param,inputs", [
    ("music_relative", ("max_relative", 24), lambda g: {"E": torch.randn(2, 24, 16, generator=g)}),
    ("cluster_mask", ("clusters", 3), lambda g: {"centroids": torch.randn(2, 3, 16, generator=g)}),
])
def test_emit_a_pattern_with_an_input_over_the_head_dim(capsys, name, param, inputs):
    """An input declared over ``dk`` (music_relative's E, cluster_mask's centroids) is sized by --head-dim: emit
    prints the very module a call with that head dim runs (it ended in "Cannot convert symbols to int")."""
    code, out, err = run(capsys, "emit", f"stdlib:{name}", "-p", f"{param[0]}={param[1]}", "--n", "40",
                         "--heads", "2", "--head-dim", "16")
    assert code == 0 and err == ""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 40, 16, generator=g) for _ in range(3))
    attn = attnc.compile_attention(f"stdlib:{name}", backend="triton", **{param[0]: param[1]})
    attn(q, k, v, **inputs(g))
    assert "def attnc_fwd(" in out
    assert out == attn.runner.last_source


# ----------------------------------------------------------------- issue 9: smaller ones
def test_show_heads_zero_is_refused(capsys, files):
    code, out, err = run(capsys, "show", str(files["ok.attn"]), "--heads", "0")
    assert code == 1 and out == ""
    assert err.startswith("argument --heads: error: must be a positive int, got 0")


def test_sim_kv_heads(capsys, files):
    """--kv-heads: the report's header and JSON say it, and the context-parallel estimate takes it; a count
    that does not divide --heads is refused at --kv-heads."""
    code, out, err = run(capsys, "sim", str(files["ok.attn"]), "--n", "2048", "--heads", "4", "--kv-heads", "2",
                         "--top", "1")
    assert code == 0 and "heads 4 sharing 2 K/V heads" in out
    code, out, err = run(capsys, "sim", str(files["ok.attn"]), "--n", "2048", "--heads", "4", "--kv-heads", "3")
    assert code == 1 and out == ""
    assert err.startswith("argument --kv-heads: error: 4 query heads cannot share 3 K/V heads")
    code, out, err = run(capsys, "sim", "stdlib:retention", "--n", "256", "--heads", "4", "--kv-heads", "2")
    assert code == 1 and out == ""
    assert err.startswith("argument --kv-heads: error: a recurrence's cost model has one K/V head per query head")


def test_show_huge_n_blames_n_with_the_memory_needed(capsys, files):
    code, out, err = run(capsys, "show", str(files["ok.attn"]), "--n", str(10**9))
    assert code == 1 and out == ""
    assert err.startswith("argument --n: error: 1000000000 queries x 1000000000 keys is too large")
    assert "GiB" in err


def test_show_grid_mismatch_names_the_sizes(capsys, files):
    code, _, err = run(capsys, "show", str(files["grid.attn"]), "--n", "10", "--sizes", "height=3,width=4")
    assert code == 1
    assert "10 queries do not match the grid grid(y: height, x: width) with y=3, x=4 = 12 tokens" in err


def test_show_png_writes_only_the_picture(capsys, files, tmp_path):
    png = tmp_path / "m.png"
    code, out, _ = run(capsys, "show", str(files["ok.attn"]), "--n", "2048", "--png", str(png))
    assert code == 0
    assert out.count("\n") == 1 and out.startswith(f"wrote {png}: local") and "2048 queries x 2048 keys" in out
    width, height, rows = read_png(png)
    assert width == height >= 2048


def test_leading_zeros_in_parameters(capsys, files):
    code, out, _ = run(capsys, "show", str(files["ok.attn"]), "--n", "6", "-p", "w=0003")
    assert code == 0 and out.splitlines()[1:] == band(6, 3)


def test_sims_sample_of_cluster_centroids_is_the_apis(capsys):
    """``attnc sim stdlib:cluster_mask`` without centroids samples them as ``attnc.simulate`` does (q, k, then the
    centroids, one seeded generator), so the two state one density (the CLI drew the centroids from a generator of
    its own: 0.1258 against the API's 0.125389 at n 1000)."""
    import json

    from attnc.cli import main

    assert main(["sim", "stdlib:cluster_mask", "--n", "600", "--json"]) == 0
    said = json.loads(capsys.readouterr().out)
    report = attnc.simulate("stdlib:cluster_mask", n=600)
    assert said["allowed_pairs"] == report.allowed_pairs and said["density"] == report.density


def test_sim_samples_missing_inputs_and_reads_tensor_files(tmp_path, capsys):
    """``attnc sim`` of a pattern with call-time inputs: without them a seeded sample, said in a note;
    ``--input NAME=FILE.pt`` reads a tensor of any shape (a per-head gate here)."""
    import json

    import torch

    from attnc.cli import main

    assert main(["sim", "stdlib:dma", "--n", "512"]) == 0  # read by its route only: sampled
    out = capsys.readouterr().out
    assert "input 'importance' not given: simulated with a sample of standard normal floats" in out
    assert main(["sim", "stdlib:dma", "--n", "512", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["n"] == 512 and "not given" in captured.err
    path = tmp_path / "g.pt"
    torch.save(torch.randn(3, 512), path)
    assert main(["sim", "stdlib:forgetting", "--n", "512", "--heads", "3", "--input", f"g={path}"]) == 0
    assert "not given" not in capsys.readouterr().out
    assert main(["sim", "stdlib:document", "--n", "512", "--input", f"doc={tmp_path / 'missing.pt'}"]) == 1
    assert "argument --input doc: error: no such file" in capsys.readouterr().err


# ----------------------------------------------------------------- rough edges a new user hit
def test_a_bad_parameter_names_the_argument(capsys):
    code, out, err = run(capsys, "show", "stdlib:sliding_window", "-p", "window=-5", "--n", "6")
    assert code == 1 and out == ""  # was an all-empty mask
    assert err.splitlines()[0] == "argument window: error: must be at least 1, got -5"
    code, _, err = run(capsys, "show", "stdlib:neighborhood_2d", "-p", "kernel_size=-3")
    assert code == 1 and "stdlib:neighborhood_2d.attn" not in err
    assert err.splitlines()[0] == ("argument kernel_size: error: must be at least 1, got -3 "
                                   "(axis y, 'kernel_size_y')")


def test_per_axis_values_of_a_parameter(capsys):
    """``-p kernel_size=3,5`` is ``kernel_size=(3, 5)``: y 3, x 5."""
    code, out, _ = run(capsys, "show", "stdlib:neighborhood_2d", "-p", "kernel_size=3,5,dilation=1",
                       "--sizes", "height=6,width=6")
    assert code == 0
    code, same, _ = run(capsys, "show", "stdlib:neighborhood_2d", "-p", "kernel_size_y=3,kernel_size_x=5",
                        "--sizes", "height=6,width=6")
    assert code == 0 and out == same
    code, _, err = run(capsys, "show", "stdlib:neighborhood_2d", "-p", "kernel_size=3,5,7")
    assert code == 1
    assert "argument kernel_size: error: expected one value or 2 (one per axis: y, x), got 3" in err
    assert "hint: or set each axis: kernel_size_y=..., kernel_size_x=..." in err
    code, _, err = run(capsys, "show", "stdlib:sliding_window", "-p", "window=3,5")
    assert code == 1 and "argument window" in err and "has no per-axis 'window'" in err


def test_show_needs_only_the_inputs_the_mask_reads(capsys, tmp_path):
    path = tmp_path / "rpb.attn"
    path.write_text("pattern p\n  tokens seq\n  input rpb: float[heads, n]\n  mask causal and q - k < 3\n"
                    "  bias rpb[h, q]\n")
    code, out, err = run(capsys, "show", str(path), "--n", "5")
    assert code == 0 and err == "" and out.splitlines()[1:] == band(5, 3)


def test_the_name_hint_speaks_the_command_line(capsys, tmp_path):
    path = tmp_path / "two.attn"
    path.write_text("pattern a\n  tokens seq\n  mask causal\npattern b\n  tokens seq\n  mask causal\n")
    code, _, err = run(capsys, "show", str(path))
    assert code == 1
    assert err.splitlines()[0] == (f"argument --name: error: {path} declares several patterns; "
                                   "pick one with --name NAME")
    code, out, _ = run(capsys, "show", str(path), "--name", "b", "--n", "2")
    assert code == 0 and out.startswith("b: ")


def test_a_file_that_is_no_tensor_is_one_line(capsys, tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(bytes(range(256)))
    code, _, err = run(capsys, "show", "stdlib:document", "--n", "4", "--input", f"doc={junk}")
    assert code == 1
    assert err.splitlines() == [f"argument --input doc: error: {junk} is not a tensor file written by "
                                "torch.save",
                                "  hint: write it with torch.save(tensor, PATH), or give the values: "
                                "--input doc=V1,V2,.."]


def test_a_stdlib_name_without_its_prefix(capsys):
    code, _, err = run(capsys, "show", "streaming")
    assert code == 1 and "hint: did you mean 'stdlib:streaming'? (a stdlib pattern)" in err


def test_list_prints_whole_first_sentences(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for line in out.splitlines():
        summary = line.split(None, 2)[2].split("  (")[0]
        assert summary.endswith("."), line
    vs = next(line for line in out.splitlines() if line.startswith("vertical_slash "))
    assert "on the key columns and diagonals that the last queries attend most." in vs
    assert len({line.index(" pattern ") if " pattern " in line else line.index(" recurrence ")
                for line in out.splitlines()}) == 1  # one column, the longest name included


def test_check_reports_every_misspelt_name(capsys, tmp_path):
    path = tmp_path / "names.attn"
    path.write_text("pattern p(window = 4)\n  tokens seq\n  mask causl and q - k < windw\n")
    code, _, err = run(capsys, "check", str(path))
    assert code == 1
    assert [line for line in err.splitlines() if "error:" in line] == [
        f"{path}:3:8: error: unknown name 'causl'", f"{path}:3:26: error: unknown name 'windw'"]


def test_a_misspelt_and_is_suggested(capsys, tmp_path):
    path = tmp_path / "adn.attn"
    path.write_text("pattern p\n  tokens seq\n  mask q >= k adn q - k < 4\n")
    code, _, err = run(capsys, "check", str(path))
    assert code == 1 and err.startswith(f"{path}:3:15: error: unexpected 'adn'")
    assert err.splitlines()[-1] == "  hint: did you mean 'and'?"


@pytest.mark.parametrize("command", ["show", "sim", "check"])
def test_an_unknown_stdlib_name_is_blamed_on_the_file_argument(capsys, command):
    code, out, err = run(capsys, command, "stdlib:mobaa")
    assert code == 1 and out == ""
    assert err.startswith("stdlib:mobaa: error: no stdlib pattern 'mobaa'") and "did you mean 'moba'" in err


def test_show_draws_a_routes_mask_without_the_inputs_only_the_route_reads(capsys):
    code, out, err = run(capsys, "show", "stdlib:dsa", "-p", "topk=4,index_heads=2,index_dim=4", "--n", "4")
    assert code == 0 and err == ""
    assert "shows the mask before the selection" in out and out.splitlines()[-4:] == ["#...", "##..", "###.", "####"]


@pytest.mark.parametrize("name", ["moba", "retention", "nsa"])
def test_sim_of_a_sequence_without_n_names_the_option(capsys, name):
    code, out, err = run(capsys, "sim", f"stdlib:{name}")
    assert code == 1 and out == ""
    assert err.startswith("argument --n: error:") and "--n 8192" in err


def test_the_command_line_page_shows_every_flag_of_every_subcommand():
    # docs/cli.md says it lists "every subcommand and flag": each flag in its subcommand's own lines of the usage block
    import argparse
    import re

    from attnc.cli import build_parser

    page = (Path(__file__).resolve().parents[2] / "docs" / "cli.md").read_text()
    usage = page[page.index("```\nattnc --version"):]
    usage = usage[:usage.index("\n```\n")]
    lines: dict[str, str] = {}
    command = None
    for line in usage.splitlines():
        m = re.match(r"attnc ([a-z-]+)", line)
        if m:
            command = m.group(1)
        if command is not None:
            lines[command] = lines.get(command, "") + "\n" + line
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, parser in sub.choices.items():
        for action in parser._actions:
            if action.help == argparse.SUPPRESS or "--help" in action.option_strings:
                continue
            for option in (o for o in action.option_strings if o.startswith("--")):
                assert option in lines.get(name, ""), f"docs/cli.md: 'attnc {name}' does not show {option}"
