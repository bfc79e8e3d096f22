"""The kernel cache: location, keys (each field matters), atomic concurrent writes,
corrupt / truncated / foreign entries ignored, ls and clear."""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

import pytest

import attnc
from attnc.compiler.analysis import evaluate as E
from attnc.runtime.tuning import kernel_cache as KC

LOCAL = "pattern local(w = 8)\n  tokens seq\n  mask causal and q - k < w\n"
PER_HEAD = "pattern ph\n  tokens seq\n  mask causal and q - k < 4 * (h + 1)\n"
USES_N = "pattern un\n  tokens seq\n  mask q == k or q >= n - 8\n"
GRID = "pattern g(r = 1)\n  tokens grid(y: height, x: width)\n  mask abs(q.y - k.y) <= r and abs(q.x - k.x) <= r\n"

CONFIG = {"q_tile": [64], "kv_tile": [32], "layout": "flat", "num_warps": 4, "num_stages": 2}


def key_of(text=LOCAL, n=1000, heads=2, head_dim=64, batch=1, dtype="bf16", sizes=None, device="cpu-interpreter",
           triton="3.6.0", attnc_v="0.1.0+abc", **params):
    pat = attnc.load(text, **params)
    bound = E.bind_sizes(pat, n=None if sizes else n, heads=heads, sizes=sizes)
    return KC.CacheKey.make(pat, bound, head_dim=head_dim, dtype=dtype, batch=batch, device=device, triton=triton,
                            attnc=attnc_v)


def source_for(tag: str) -> str:
    return f"# kernel {tag}\nTAG = {tag!r}\n\ndef kernel(x):\n    return x\n"


@pytest.fixture
def cache(tmp_path):
    return KC.KernelCache(tmp_path / "cache")


# ----------------------------------------------------------------- location
def test_default_dir_env_and_xdg(monkeypatch, tmp_path):
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert KC.default_dir() == tmp_path / "explicit"
    assert KC.KernelCache().dir == tmp_path / "explicit" / "kernels"
    monkeypatch.delenv("ATTNC_CACHE_DIR")
    assert KC.default_dir() == tmp_path / "xdg" / "attnc"
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/dir")  # invalid per the XDG spec: ignored
    assert KC.default_dir() == tmp_path / "home" / ".cache" / "attnc"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert KC.default_dir() == tmp_path / "home" / ".cache" / "attnc"
    monkeypatch.setenv("ATTNC_CACHE_DIR", "   ")  # blank: as if unset
    assert KC.default_dir() == tmp_path / "home" / ".cache" / "attnc"


# ----------------------------------------------------------------- shape buckets
def next_pow2(x: int) -> int:
    p = 1
    while p < x:
        p *= 2
    return p


@pytest.mark.parametrize("n", [1, 15, 16, 17, 100, 1000, 1024, 1025, 4097])
@pytest.mark.parametrize("head_dim", [16, 40, 64, 96, 128, 200])
def test_bucket_rule_seq(n, head_dim):
    pat = attnc.load(LOCAL)
    bucket = KC.shape_bucket(pat, E.bind_sizes(pat, n=n, heads=3), head_dim=head_dim, batch=3)
    assert bucket == {"n": max(16, next_pow2(n)), "heads": 4, "head_dim": max(16, next_pow2(head_dim)), "batch": 4}


def test_bucket_exact_where_the_pattern_depends_on_it():
    ph = attnc.load(PER_HEAD)
    assert KC.shape_bucket(ph, E.bind_sizes(ph, n=100, heads=3), head_dim=64)["heads"] == 3
    un = attnc.load(USES_N)
    assert KC.shape_bucket(un, E.bind_sizes(un, n=100, heads=3), head_dim=64)["n"] == 100
    g = attnc.load(GRID)
    b = KC.shape_bucket(g, E.bind_sizes(g, sizes={"height": 12, "width": 20}), head_dim=64)
    assert b["axes"] == {"height": 12, "width": 20} and "n" not in b


# ----------------------------------------------------------------- keys
def test_keys_differ_by_each_field():
    base = key_of()
    variants = {
        "ir (parameter)": key_of(w=9),
        "ir (mask)": key_of(LOCAL.replace("q - k < w", "q - k <= w")),
        "n bucket": key_of(n=1025),
        "heads bucket": key_of(heads=3),
        "head_dim bucket": key_of(head_dim=128),
        "batch bucket": key_of(batch=2),
        "dtype": key_of(dtype="fp16"),
        "device": key_of(device="NVIDIA H200"),
        "triton": key_of(triton="3.7.0"),
        "attnc": key_of(attnc_v="0.1.0+def"),
    }
    digests = {base.digest()} | {k.digest() for k in variants.values()}
    assert len(digests) == len(variants) + 1
    for what, k in variants.items():
        assert k != base, what
    # the same bucket: the same key
    assert key_of(n=1000) == base and key_of(n=513).digest() == base.digest()
    assert key_of(n=1024, heads=2, head_dim=50) == base
    # grid axes are exact
    assert key_of(GRID, sizes={"height": 8, "width": 8}) != key_of(GRID, sizes={"height": 8, "width": 9})


def test_key_fields_of_a_real_machine():
    pat = attnc.load(LOCAL)
    k = KC.CacheKey.make(pat, E.bind_sizes(pat, n=64), head_dim=64, dtype="BF16")
    assert k.dtype == "bf16"
    assert k.device == KC.device_name()
    assert k.triton == KC.triton_version() and k.triton != ""
    assert k.attnc.startswith(attnc.__version__ + "+")
    assert k.ir_hash == pat.key()


def test_variant_key_misses(cache):
    base = key_of()
    cache.put(base, source_for("a"), CONFIG, shape={"n": 1000})
    assert cache.get(base) is not None
    for other in (key_of(dtype="fp16"), key_of(device="NVIDIA H100 80GB HBM3"), key_of(triton="3.7.0"),
                  key_of(attnc_v="0.2.0+abc"), key_of(w=9), key_of(n=4096)):
        assert cache.get(other) is None
        assert cache.last_miss == "absent"


# ----------------------------------------------------------------- round trip
def test_put_get_round_trip(cache):
    k = key_of()
    src = source_for("round")
    entry = cache.put(k, src, CONFIG, shape={"n": 1000, "head_dim": 64}, meta={"trials": [{"ms": 1.5}]})
    got = cache.get(k)
    assert got is not None and cache.last_miss is None
    assert got.config == CONFIG and got.source == src and got.shape == {"n": 1000, "head_dim": 64}
    assert got.meta == {"trials": [{"ms": 1.5}]}
    assert got.source_path == entry.source_path and got.source_path.read_text() == src
    sha = hashlib.sha256(src.encode()).hexdigest()
    assert got.source_path.name == f"{k.digest()}-{sha[:16]}.py"
    data = json.loads((cache.dir / f"{k.digest()}.json").read_text())
    assert data["config"] == CONFIG and data["source_sha256"] == sha and data["pattern"] == "local"
    # replacing the entry
    cache.put(k, source_for("second"), {**CONFIG, "num_warps": 8}, shape={"n": 1000})
    assert cache.get(k).config["num_warps"] == 8 and "second" in cache.get(k).source
    assert not [p for p in cache.dir.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("bad", [
    {**CONFIG, "num_warps": 3}, {**CONFIG, "num_warps": True}, {**CONFIG, "num_stages": 0},
    {**CONFIG, "layout": "diagonal"}, {**CONFIG, "q_tile": []}, {**CONFIG, "kv_tile": [0]},
    {k: v for k, v in CONFIG.items() if k != "layout"}, [64, 32],
])
def test_put_refuses_bad_config(cache, bad):
    with pytest.raises(ValueError):
        cache.put(key_of(), source_for("x"), bad, shape={})
    assert cache.get(key_of()) is None


# ----------------------------------------------------------------- corrupt, truncated, foreign
def _json(cache, k) -> Path:
    return cache.dir / f"{k.digest()}.json"


def _resign(data: dict) -> dict:
    body = {k: v for k, v in data.items() if k != "checksum"}
    data["checksum"] = hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return data


CORRUPTIONS = {
    "truncated json": lambda p, s: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    "empty json": lambda p, s: p.write_bytes(b""),
    "garbage json": lambda p, s: p.write_bytes(bytes(range(256))),
    "json list": lambda p, s: p.write_text("[1, 2, 3]"),
    "edited config": lambda p, s: p.write_text(p.read_text().replace('"num_warps": 4', '"num_warps": 8')),
    "bad config resigned": lambda p, s: p.write_text(json.dumps(_resign(
        {**json.loads(p.read_text()), "config": {**CONFIG, "num_warps": 5}}))),
    "other format": lambda p, s: p.write_text(json.dumps(_resign({**json.loads(p.read_text()), "format": 99}))),
    "source truncated": lambda p, s: s.write_bytes(s.read_bytes()[:10]),
    "source missing": lambda p, s: s.unlink(),
    "source flipped": lambda p, s: s.write_bytes(s.read_bytes().replace(b"kernel", b"kernal")),
}


@pytest.mark.parametrize("how", sorted(CORRUPTIONS))
def test_corrupt_entry_is_ignored_then_rebuilt(cache, how):
    k = key_of()
    entry = cache.put(k, source_for("good"), CONFIG, shape={"n": 1000})
    CORRUPTIONS[how](_json(cache, k), entry.source_path)
    assert cache.get(k) is None
    assert cache.last_miss.startswith(("corrupt", "foreign")), cache.last_miss
    infos = cache.entries()
    assert len(infos) == 1 and infos[0].status.startswith("invalid"), infos
    cache.put(k, source_for("rebuilt"), CONFIG, shape={"n": 1000})
    got = cache.get(k)
    assert got is not None and "rebuilt" in got.source
    assert cache.entries()[0].status == "stale" or cache.entries()[0].status == "ok"


def test_foreign_entry_under_another_name_is_not_trusted(cache):
    a, b = key_of(), key_of(dtype="fp16")
    cache.put(a, source_for("a"), CONFIG, shape={})
    # an entry of key a copied (or renamed) to key b's file
    _json(cache, b).write_bytes(_json(cache, a).read_bytes())
    assert cache.get(b) is None and cache.last_miss.startswith("foreign") and "dtype" in cache.last_miss
    # an older attnc's entry under the current name
    data = json.loads(_json(cache, a).read_text())
    data["key"]["attnc"] = "0.0.1+old"
    _json(cache, a).write_text(json.dumps(_resign(data)))
    assert cache.get(a) is None and "attnc" in cache.last_miss


def test_source_outside_the_cache_is_never_read(cache, tmp_path):
    k = key_of()
    cache.put(k, source_for("a"), CONFIG, shape={})
    evil = tmp_path / "evil.py"
    evil.write_text("raise SystemExit('pwned')\n")
    data = json.loads(_json(cache, k).read_text())
    data["source_sha256"] = "../../evil"
    _json(cache, k).write_text(json.dumps(_resign(data)))
    assert cache.get(k) is None and "hash" in cache.last_miss


# ----------------------------------------------------------------- concurrency
def _writer(root: str, tag: str, rounds: int) -> None:
    cache = KC.KernelCache(root)
    k = key_of()
    warps = 4 if int(tag[1:]) % 2 else 8
    for i in range(rounds):
        src = source_for(f"{tag}-{i}") + "# " + "x" * (2000 + 37 * i) + "\n"  # sizes differ: tears would show
        cache.put(k, src, {**CONFIG, "num_warps": warps}, shape={"writer": tag, "round": i, "warps": warps})


def _reader(root: str, done, out) -> None:
    cache = KC.KernelCache(root)
    k = key_of()
    seen, bad, rounds = 0, [], 0
    while not done.is_set() or rounds < 50:
        rounds += 1
        e = cache.get(k)
        if e is None:
            if cache.last_miss != "absent":
                bad.append(cache.last_miss)
            continue
        seen += 1
        tag = f"{e.shape['writer']}-{e.shape['round']}"
        if f"TAG = {tag!r}" not in e.source or e.config["num_warps"] != e.shape["warps"]:
            bad.append(f"mismatched entry {tag}")
    out.put((seen, bad))


def test_concurrent_writers_never_produce_a_corrupt_entry(tmp_path):
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    root = str(tmp_path / "cache")
    q, done = ctx.Queue(), ctx.Event()
    writers = [ctx.Process(target=_writer, args=(root, f"w{i}", 25)) for i in range(6)]
    readers = [ctx.Process(target=_reader, args=(root, done, q)) for _ in range(2)]
    for p in readers + writers:
        p.start()
    for p in writers:
        p.join(timeout=120)
        assert p.exitcode == 0
    done.set()
    results = [q.get(timeout=120) for _ in readers]
    for p in readers:
        p.join(timeout=120)
        assert p.exitcode == 0
    assert sum(seen for seen, _ in results) > 0
    for _seen, bad in results:
        assert bad == []
    cache = KC.KernelCache(root)
    final = cache.get(key_of())
    assert final is not None, cache.last_miss
    assert final.shape["round"] == 24  # the last write of some writer won, whole
    assert f"TAG = '{final.shape['writer']}-24'" in final.source
    assert not [n for n in os.listdir(cache.dir) if n.startswith(".tmp-")]
    infos = cache.entries()
    assert len(infos) == 1 and infos[0].status != "invalid"


# ----------------------------------------------------------------- ls and clear
def test_ls_lists_fields_size_age_and_status(cache):
    here = dict(device=KC.device_name(), triton=KC.triton_version(), attnc_v=KC.attnc_version())
    ok = key_of(**here)
    stale = key_of(**{**here, "triton": "0.0.0"})
    broken = key_of(dtype="fp16", **here)
    e_ok = cache.put(ok, source_for("ok"), CONFIG, shape={})
    cache.put(stale, source_for("stale"), CONFIG, shape={})
    cache.put(broken, source_for("broken"), CONFIG, shape={})
    _json(cache, broken).write_text("{")
    old = time.time() - 3 * 3600 - 5
    os.utime(_json(cache, ok), (old, old))
    infos = {i.digest: i for i in cache.entries()}
    assert set(infos) == {ok.digest(), stale.digest(), broken.digest()}
    i = infos[ok.digest()]
    assert i.status == "ok" and i.pattern == "local" and i.config == CONFIG
    assert i.fields == ok.fields()
    assert i.size == _json(cache, ok).stat().st_size + e_ok.source_path.stat().st_size
    assert 3 * 3600 <= i.age_s < 3 * 3600 + 60 and KC.human_age(i.age_s) == "3h"
    assert infos[stale.digest()].status == "stale"
    assert infos[broken.digest()].status.startswith("invalid") and infos[broken.digest()].size == 1
    assert cache.entries()[-1].digest == ok.digest()  # oldest last


def test_clear_removes_entries_and_nothing_else(cache):
    for i in range(3):
        cache.put(key_of(n=100 * 2**i), source_for(str(i)), CONFIG, shape={})
    (cache.dir / "notes.txt").write_text("mine")
    (cache.dir / f".tmp-{'a' * 32}-x").write_text("half")
    (cache.dir / f"src-{'b' * 16}.py").write_text("x = 1\n")
    (cache.root / "other").write_text("keep")
    assert cache.clear() == 3
    assert sorted(os.listdir(cache.dir)) == ["notes.txt"]
    assert (cache.root / "other").read_text() == "keep"
    assert cache.entries() == [] and cache.clear() == 0
    (cache.dir / "notes.txt").unlink()
    assert cache.clear() == 0


def test_clear_and_ls_say_what_they_could_not_do(cache, monkeypatch, capsys):
    from attnc import cli

    cache.put(key_of(), source_for("0"), CONFIG, shape={})
    (cache.dir / f"{'c' * 32}.json").mkdir()  # a directory under an entry's name: not removed
    assert cache.clear() == 1 and cache.not_removed == [f"{'c' * 32}.json (Is a directory)"]
    monkeypatch.setenv("ATTNC_CACHE_DIR", str(cache.root))
    assert cli.main(["cache", "clear"]) == 1  # it said "removed 0 entries" and exited 0
    err = capsys.readouterr().err
    assert "could not remove 1 file" in err and "Is a directory" in err
    # a cache directory that is a file: said so, not "no entries"
    (cache.dir / f"{'c' * 32}.json").rmdir()
    cache.dir.rmdir()
    cache.dir.write_text("x")
    for action in ("ls", "clear"):
        assert cli.main(["cache", action]) == 1
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("environment ATTNC_CACHE_DIR: error:") and "is not a directory" in err


def test_empty_or_missing_cache(tmp_path):
    c = KC.KernelCache(tmp_path / "nope")
    assert c.entries() == [] and c.clear() == 0 and c.get(key_of()) is None and c.last_miss == "absent"
    assert not (tmp_path / "nope").exists()


def test_display_helpers():
    assert KC.human_size(512) == "512 B" and KC.human_size(1536) == "1.5 KiB" and KC.human_size(3 << 20) == "3.0 MiB"
    assert KC.human_age(5) == "5s" and KC.human_age(125) == "2m" and KC.human_age(2 * 86400 + 1) == "2d"
    assert KC.describe_config(CONFIG) == "64/32 flat w4 s2"
    assert KC.describe_config({**CONFIG, "tma": True}) == "64/32 flat w4 s2 tma"
    assert KC.describe_config({**CONFIG, "atomic_dq": True}) == "64/32 flat w4 s2 atomic-dq"
    assert KC.describe_bucket({"n": 1024, "heads": 2, "head_dim": 64, "batch": 1}) == "n<=1024 heads=2 d<=64 b<=1"
    assert KC.describe_bucket({"axes": {"height": 8, "width": 16}, "heads": 1, "head_dim": 64, "batch": 1}) \
        == "height=8xwidth=16 heads=1 d<=64 b<=1"


# ----------------------------------------------------------------- issue 9: private source folders
def test_generated_sources_go_to_a_private_folder_removed_at_exit(tmp_path):
    """Each process used to leave /tmp/attnc-kernels-*; autotune used the shared /tmp/attnc-sources."""
    import subprocess
    import textwrap

    code = textwrap.dedent(f"""
        import os, tempfile
        tempfile.tempdir = {str(tmp_path)!r}
        from attnc.runtime.tuning import autotune
        from attnc.runtime.backends.triton import runner as triton_backend
        folder = triton_backend.source_dir()
        path = triton_backend.write_source("x = 1\\n")
        scratch = autotune.scratch_source("y = 2\\n")
        print(folder, path, scratch, oct(os.stat(folder).st_mode & 0o777))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    folder, path, scratch, mode = out.split()
    assert mode == oct(0o700)
    assert path.startswith(folder + os.sep) and scratch.startswith(folder + os.sep)
    assert "attnc-sources" not in scratch
    assert not os.path.exists(folder), "the process left its source folder behind"
    assert not any(p.name.startswith("attnc-") for p in tmp_path.iterdir())
