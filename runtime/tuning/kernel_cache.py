"""The on-disk kernel cache: generated kernel source and the autotuned winner.

Where: ``$ATTNC_CACHE_DIR`` when set, else the user cache directory
(``$XDG_CACHE_HOME/attnc``, default ``~/.cache/attnc``; ``~/Library/Caches/attnc``
on macOS, ``%LOCALAPPDATA%\\attnc\\Cache`` on Windows). Entries live in its
``kernels/`` subdirectory; nothing else of the directory is ever touched.

Key (``CacheKey``): the IR hash (``PatternIR.key()``: mask, score terms,
layouts, routing and inputs with the parameters folded in), the shape bucket,
the dtype, the device (``torch.cuda.get_device_name``, or ``cpu-interpreter``),
the Triton version and the attnc version (``__version__`` plus a fingerprint of
the code generator's sources, so an edited code generator never reuses old
kernels).

Shape bucket (``shape_bucket``), the rule:

- grid axis extents: exact (tile boxes are bounded by the extents and the tile
  classification depends on each of them; models use few resolutions);
- ``n`` / ``nk`` of ``tokens seq`` layouts: the next power of two (at least
  16), unless the pattern's expressions mention ``n`` / ``nk`` (then exact);
- ``heads``: the next power of two, unless the mask or a score term depends on
  the head (``h``) or mentions ``heads`` (per-head structure: exact);
- ``head_dim``: the next power of two, at least 16 (the kernel pads to it);
- ``batch``: the next power of two;
- ``group``, the query heads per K/V head (grouped-query attention): exact, and
  only keyed when above 1 (the dK/dV kernel's CTAs, and so the winner, depend on
  it; a multi-head call's key is the same as before K/V heads were keyed).

The tuned configuration carries over within a bucket; the stored source is
used only for the exact shape it was generated for (``Entry.shape``), the
caller regenerates it (cheap, no re-tuning) for another shape of the bucket.

Files: ``<digest>.json`` (key fields, winning config, timings, checksum) and
``<digest>-<sha16>.py`` (the source, content-addressed: its name carries the
first 16 hex digits of its SHA-256). Writes go to a temporary file in the same
directory, are fsynced and renamed with ``os.replace``: the source first, then
the JSON, which is the commit point. Readers therefore see the old entry, the
new one, or none, never a torn one, whatever number of processes write. An
entry that does not parse, fails its checksum, names another key, format or
version, or whose source is missing or does not match its hash is ignored
(``get`` returns None and ``last_miss`` says why) and rebuilt by the caller.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...compiler.analysis.tiles import mentioned_symbols
from ...compiler.cost.model import checked_kv_heads
from ...core import ir
from ...core import symbols as S

#: On-disk format of the JSON entries; bumped when it changes (older entries are then foreign).
FORMAT = 1
CPU_DEVICE = "cpu-interpreter"
LAYOUTS = ("flat", "permute", "address")
#: Sources whose text decides the generated kernels, their code or the data layouts they read
#: (fingerprinted into the attnc version: a change re-keys the cache).
CODEGEN_FILES = ("compiler/codegen/triton/source.py", "compiler/codegen/expr_printer.py", "compiler/codegen/triton/bias.py",
                 "compiler/codegen/triton/exprs.py", "compiler/codegen/triton/helpers.py", "compiler/codegen/triton/kernels.py",
                 "compiler/codegen/triton/scores.py", "compiler/codegen/triton/tiles.py", "compiler/analysis/route_blocks.py",
                 "runtime/plan/routing.py", "runtime/backends/triton/runner.py",
                 "runtime/backends/triton/kernel_launch.py", "runtime/backends/triton/forward.py",
                 "runtime/backends/triton/backward.py", "runtime/backends/triton/tma.py")

_DIGEST = re.compile(r"^[0-9a-f]{32}$")
_ENTRY_JSON = re.compile(r"^([0-9a-f]{32})\.json$")
_ENTRY_PY = re.compile(r"^([0-9a-f]{32})-([0-9a-f]{16})\.py$")
_SCRATCH = re.compile(r"^src-[0-9a-f]{16}\.py$")  # regenerated sources (see autotune.scratch_source)
_TEMP = re.compile(r"^\.tmp-[0-9a-f]{32}-")


# ----------------------------------------------------------------- locations and versions
def default_dir() -> Path:
    """``$ATTNC_CACHE_DIR``, else the platform's user cache directory + ``attnc``."""
    env = os.environ.get("ATTNC_CACHE_DIR", "").strip()
    if env:
        return _expand(env, "ATTNC_CACHE_DIR")
    if sys.platform == "win32":
        base = os.environ.get("LOCALAPPDATA", "").strip()
        return (Path(base) if base else Path.home() / "AppData" / "Local") / "attnc" / "Cache"
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "attnc"
    xdg = os.environ.get("XDG_CACHE_HOME", "").strip()
    if xdg and os.path.isabs(xdg):  # the XDG spec: relative paths are invalid and ignored
        return Path(xdg) / "attnc"
    return Path.home() / ".cache" / "attnc"


def _expand(path: str | os.PathLike, what: str) -> Path:
    """``~`` and ``~user`` expanded; an unknown user or no home is a clean error."""
    try:
        return Path(path).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory"
        from ...core.errors import SpecError

        raise SpecError(f"cannot expand {os.fspath(path)!r}: no such user or no home directory",
                        where=what, hint="give an absolute path") from None


def triton_version() -> str:
    try:
        import triton
    except Exception:  # noqa: BLE001 - no Triton (or a broken one): a key of its own
        return "none"
    return str(getattr(triton, "__version__", "unknown"))


_FINGERPRINT: str | None = None


def attnc_version() -> str:
    """``__version__`` + ``+`` + 12 hex digits of the code generator's sources."""
    global _FINGERPRINT
    from ...core.version import __version__

    if _FINGERPRINT is None:
        root = Path(__file__).resolve().parent.parent.parent  # the package root (this file is runtime/tuning/)
        h = hashlib.sha256()
        for rel in CODEGEN_FILES:
            path = root / rel
            h.update(rel.encode() + b"\0")
            with contextlib.suppress(OSError):
                h.update(path.read_bytes())
            h.update(b"\0")
        _FINGERPRINT = h.hexdigest()[:12]
    return f"{__version__}+{_FINGERPRINT}"


def device_name(device=None) -> str:
    """The GPU's name for a CUDA device, else ``cpu-interpreter``."""
    import torch

    dev = torch.device(device) if device is not None else None
    if dev is not None and dev.type != "cuda":
        return CPU_DEVICE
    if not torch.cuda.is_available():
        return CPU_DEVICE
    return torch.cuda.get_device_name(dev if dev is not None and dev.index is not None else None)


# ----------------------------------------------------------------- shape buckets
def pow2_ceil(x: int, floor: int = 1) -> int:
    x = max(int(x), floor, 1)
    return 1 << (x - 1).bit_length()


def shape_bucket(pat: ir.PatternIR, bound, *, head_dim: int, batch: int = 1, kv_heads: int | None = None) -> dict:
    """The bucket of a shape (see the module docstring for the rule), a JSON-able dict; ``kv_heads``: the
    K/V heads the query heads share (None: one per head)."""
    syms = mentioned_symbols(pat)
    out: dict = {}
    if bound.axis_sizes:
        out["axes"] = {str(k): int(v) for k, v in sorted(bound.axis_sizes.items())}
    for role, layout, value, sym in (("n", pat.queries, bound.n, S.N), ("nk", pat.keys, bound.nk, S.NK)):
        if layout.kind == "seq" and not (role == "nk" and pat.self_attention):
            out[role] = int(value) if sym in syms else pow2_ceil(value, 16)
    per_head = S.H in syms or S.HEADS in syms
    out["heads"] = int(bound.heads) if per_head else pow2_ceil(bound.heads)
    out["head_dim"] = pow2_ceil(head_dim, 16)
    out["batch"] = pow2_ceil(batch)
    group = kv_group(bound.heads, kv_heads)
    if group > 1:
        out["group"] = group
    return out


def kv_group(heads: int, kv_heads: int | None) -> int:
    """Query heads per K/V head (1 without ``kv_heads``), ``kv_heads`` checked to divide ``heads``."""
    return int(heads) // checked_kv_heads(int(heads), kv_heads)


def exact_shape(bound, *, head_dim: int, batch: int = 1, kv_heads: int | None = None) -> dict:
    """The exact shape a source was generated for (``kv_heads`` only where several query heads share one)."""
    shape = {"n": int(bound.n), "nk": int(bound.nk), "heads": int(bound.heads),
             "axes": {str(k): int(v) for k, v in sorted(bound.axis_sizes.items())},
             "head_dim": int(head_dim), "batch": int(batch)}
    if kv_group(bound.heads, kv_heads) > 1:
        shape["kv_heads"] = int(kv_heads)
    return shape


# ----------------------------------------------------------------- keys and entries
@dataclass(frozen=True)
class CacheKey:
    """Everything a cached kernel depends on. ``pattern`` (the name) is informational, not keyed."""

    ir_hash: str
    bucket: tuple  # sorted (name, value) pairs of ``shape_bucket``
    dtype: str
    device: str
    triton: str
    attnc: str
    pattern: str = field(default="", compare=False)

    @classmethod
    def make(cls, pat: ir.PatternIR, bound, *, head_dim: int, dtype: str, batch: int = 1, device: str | None = None,
             triton: str | None = None, attnc: str | None = None, kv_heads: int | None = None) -> CacheKey:
        bucket = shape_bucket(pat, bound, head_dim=head_dim, batch=batch, kv_heads=kv_heads)
        return cls(pat.key(), _freeze(bucket), str(dtype).lower(), device if device is not None else device_name(),
                   triton if triton is not None else triton_version(),
                   attnc if attnc is not None else attnc_version(), pattern=pat.name)

    def fields(self) -> dict:
        """The keyed fields as JSON values (what an entry must match)."""
        return {"ir_hash": self.ir_hash, "bucket": _thaw(self.bucket), "dtype": self.dtype, "device": self.device,
                "triton": self.triton, "attnc": self.attnc}

    def digest(self) -> str:
        return hashlib.sha256(_canonical(self.fields()).encode()).hexdigest()[:32]


def _freeze(x):
    if isinstance(x, dict):
        return tuple((k, _freeze(v)) for k, v in sorted(x.items()))
    return x


def _thaw(x):
    if isinstance(x, tuple):
        return {k: _thaw(v) for k, v in x}
    return x


def _canonical(x) -> str:
    return json.dumps(x, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)


def validate_config(config) -> str | None:
    """None when ``config`` is a well-formed kernel configuration dict, else what is wrong."""
    if not isinstance(config, dict):
        return "config is not an object"
    for tile in ("q_tile", "kv_tile"):
        t = config.get(tile)
        if not isinstance(t, list) or not t or not all(_pos_int(x) for x in t):
            return f"bad {tile}"
    if config.get("layout") not in LAYOUTS:
        return "bad layout"
    w = config.get("num_warps")
    if not _pos_int(w) or w & (w - 1) or w > 32:
        return "bad num_warps"
    if not _pos_int(config.get("num_stages")) or config["num_stages"] > 16:
        return "bad num_stages"
    return None


def _pos_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x > 0


@dataclass
class Entry:
    """A valid cache entry."""

    key: CacheKey
    config: dict
    source: str
    source_path: Path
    shape: dict
    created: float
    meta: dict


@dataclass
class EntryInfo:
    """One line of ``ls``: what a JSON file says, and whether it can be trusted."""

    digest: str
    status: str  # "ok", "stale" (other Triton/attnc version or device here), or "invalid: why"
    size: int
    age_s: float
    fields: dict
    pattern: str = ""
    config: dict | None = None


class KernelCache:
    """The cache directory. Safe for concurrent processes (see the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = _expand(root, "argument root") if root is not None else default_dir()
        self.dir = self.root / "kernels"
        #: why the last ``get`` missed: "absent", "corrupt: ...", "foreign: ..."
        self.last_miss: str | None = None

    # ------------------------------------------------------------ reading
    def json_path(self, digest: str) -> Path:
        return self.dir / f"{digest}.json"

    def source_path(self, digest: str, sha: str) -> Path:
        return self.dir / f"{digest}-{sha[:16]}.py"

    def get(self, key: CacheKey) -> Entry | None:
        """The entry of ``key`` when present and valid; None otherwise (``last_miss`` says why)."""
        digest = key.digest()
        data, why = self._read_json(self.json_path(digest))
        if data is None:
            self.last_miss = why
            return None
        why = self._check(data, digest, key)
        if why is not None:
            self.last_miss = why
            return None
        sha = data["source_sha256"]
        path = self.source_path(digest, sha)
        try:
            raw = path.read_bytes()
        except OSError:
            self.last_miss = "corrupt: source file missing"
            return None
        if hashlib.sha256(raw).hexdigest() != sha:
            self.last_miss = "corrupt: source does not match its hash"
            return None
        try:
            source = raw.decode("utf-8")
            compile(source, str(path), "exec")
        except (UnicodeDecodeError, SyntaxError, ValueError):
            self.last_miss = "corrupt: source is not valid Python"
            return None
        self.last_miss = None
        return Entry(key, data["config"], source, path, data["shape"], float(data["created"]), data.get("meta", {}))

    @staticmethod
    def _read_json(path: Path) -> tuple[dict | None, str]:
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            return None, "absent"
        except OSError as err:
            return None, f"corrupt: unreadable ({err.strerror})"
        try:
            data = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            return None, "corrupt: not JSON (truncated?)"
        if not isinstance(data, dict):
            return None, "corrupt: not a JSON object"
        return data, ""

    @staticmethod
    def _check(data: dict, digest: str, key: CacheKey | None) -> str | None:
        """None when ``data`` is a sound entry (of ``key`` when given), else why not."""
        if data.get("format") != FORMAT:
            return f"foreign: format {data.get('format')!r}"
        body = {k: v for k, v in data.items() if k != "checksum"}
        try:
            checksum = hashlib.sha256(_canonical(body).encode()).hexdigest()
        except (TypeError, ValueError):
            return "corrupt: unserialisable fields"
        if data.get("checksum") != checksum:
            return "corrupt: checksum mismatch"
        fields = data.get("key")
        if not isinstance(fields, dict):
            return "corrupt: no key"
        if key is not None and fields != key.fields():
            differ = sorted(k for k in set(fields) | set(key.fields()) if fields.get(k) != key.fields().get(k))
            return "foreign: other " + ", ".join(differ)
        if hashlib.sha256(_canonical(fields).encode()).hexdigest()[:32] != digest:
            return "foreign: key does not match the file name"
        why = validate_config(data.get("config"))
        if why is not None:
            return "corrupt: " + why
        sha = data.get("source_sha256")
        if not isinstance(sha, str) or not re.fullmatch(r"[0-9a-f]{64}", sha):
            return "corrupt: bad source hash"
        if not isinstance(data.get("shape"), dict) or not isinstance(data.get("created"), int | float):
            return "corrupt: bad shape or time"
        return None

    # ------------------------------------------------------------ writing
    def put(self, key: CacheKey, source: str, config: dict, *, shape: dict, meta: dict | None = None) -> Entry:
        """Store (or replace) the entry of ``key``, atomically."""
        why = validate_config(config)
        if why is not None:
            raise ValueError(f"refusing to cache a bad kernel config: {why}")
        digest = key.digest()
        raw = source.encode("utf-8")
        sha = hashlib.sha256(raw).hexdigest()
        self.dir.mkdir(parents=True, exist_ok=True)
        path = self.source_path(digest, sha)
        _atomic_write(path, raw, digest)
        body = {"format": FORMAT, "key": key.fields(), "pattern": key.pattern, "config": config,
                "source_sha256": sha, "shape": shape, "created": time.time(), "meta": meta or {}}
        body["checksum"] = hashlib.sha256(_canonical(body).encode()).hexdigest()
        _atomic_write(self.json_path(digest), (json.dumps(body, indent=1, sort_keys=True, allow_nan=False)
                                               + "\n").encode(), digest)
        _fsync_dir(self.dir)
        return Entry(key, config, source, path, shape, body["created"], body["meta"])

    # ------------------------------------------------------------ listing and clearing
    def entries(self) -> list[EntryInfo]:
        """Every JSON entry of the directory, valid or not, newest first."""
        if not self.dir.is_dir():
            return []
        here = {"device": device_name(), "triton": triton_version(), "attnc": attnc_version()}
        now = time.time()
        out = []
        for name in sorted(os.listdir(self.dir)):
            m = _ENTRY_JSON.match(name)
            if not m:
                continue
            digest = m.group(1)
            path = self.dir / name
            try:
                st = path.stat()
            except OSError:
                continue  # removed meanwhile
            data, why = self._read_json(path)
            size, age = st.st_size, max(0.0, now - st.st_mtime)
            if data is None:
                out.append(EntryInfo(digest, "invalid: " + why.removeprefix("corrupt: "), size, age, {}))
                continue
            why = self._check(data, digest, None)
            fields = data.get("key") if isinstance(data.get("key"), dict) else {}
            if why is None:
                sha = data["source_sha256"]
                src = self.source_path(digest, sha)
                try:
                    raw = src.read_bytes()
                    size += len(raw)
                    if hashlib.sha256(raw).hexdigest() != sha:
                        why = "corrupt: source does not match its hash"
                except OSError:
                    why = "corrupt: source file missing"
            if why is not None:
                status = "invalid: " + why
            elif any(fields.get(k) != v for k, v in here.items()):
                status = "stale"
            else:
                status = "ok"
            config = data.get("config") if isinstance(data.get("config"), dict) else None
            pattern = data.get("pattern") if isinstance(data.get("pattern"), str) else ""
            out.append(EntryInfo(digest, status, size, age, fields, pattern, config))
        out.sort(key=lambda e: (e.age_s, e.digest))
        return out

    def problem(self) -> str | None:
        """Why this cache's directory cannot be listed, or None (an absent one is none: nothing is cached yet)."""
        for path in (self.root, self.dir):
            if path.exists() and not path.is_dir():
                return f"{path} is not a directory"
        return None

    def clear(self) -> int:
        """Remove every entry (and stray source and temporary files); the number of entries removed. What could
        not be removed (a read-only directory, a directory under an entry's name) is in ``not_removed``."""
        self.not_removed: list[str] = []
        if not self.dir.is_dir():
            return 0
        removed = 0
        for name in os.listdir(self.dir):
            is_json = bool(_ENTRY_JSON.match(name))
            if not (is_json or _ENTRY_PY.match(name) or _SCRATCH.match(name) or _TEMP.match(name)):
                continue  # not ours: never touched
            try:
                os.unlink(self.dir / name)
            except FileNotFoundError:
                continue
            except OSError as err:
                self.not_removed.append(f"{name} ({err.strerror or type(err).__name__})")
                continue
            removed += is_json
        with contextlib.suppress(OSError):
            self.dir.rmdir()  # only when empty
        return removed


def _atomic_write(path: Path, data: bytes, digest: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".tmp-{digest}-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ----------------------------------------------------------------- display helpers
def printable(text: object) -> str:
    """``text`` safe for a terminal: control characters (escape codes from a
    planted or corrupt entry) become ``?``."""
    return "".join(c if c.isprintable() else "?" for c in str(text))


def describe_bucket(bucket: dict) -> str:
    """``16x16 heads=8 d<=128 b<=1`` for a shape bucket; ``?`` when it is malformed."""
    if not isinstance(bucket, dict):
        return "?"
    axes = bucket.get("axes")
    parts = [f"{k}={v}" for k, v in axes.items()] if isinstance(axes, dict) else []
    for name in ("n", "nk"):
        if name in bucket:
            parts.append(f"{name}<={bucket[name]}")
    head = "x".join(parts) if axes else " ".join(parts)
    group = f" group={bucket['group']}" if "group" in bucket else ""  # query heads per K/V head
    return printable(" ".join(p for p in (head, f"heads={bucket.get('heads')}{group}",
                                          f"d<={bucket.get('head_dim')}", f"b<={bucket.get('batch')}") if p))


def describe_config(config: dict | None) -> str:
    """``64/64 flat w4 s2`` for a kernel config (`` tma`` after it where its tiles load by TMA, `` atomic-dq``
    where its backward adds dQ by atomics, `` ws`` where its forward is warp-specialized); ``?`` when it is
    malformed."""
    if not config:
        return "-"
    if validate_config(config) is not None:
        return "?"
    return printable(f"{'x'.join(map(str, config['q_tile']))}/{'x'.join(map(str, config['kv_tile']))} "
                     f"{config['layout']} w{config['num_warps']} s{config['num_stages']}"
                     + (" tma" if config.get("tma") is True else "")
                     + (" atomic-dq" if config.get("atomic_dq") is True else "")
                     + (" ws" if config.get("warp_specialize") is True else ""))


def human_size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def human_age(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    for unit, span in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= span:
            return f"{int(s // span)}{unit}"
    return f"{int(s)}s"


__all__ = ["CPU_DEVICE", "CacheKey", "Entry", "EntryInfo", "FORMAT", "KernelCache", "attnc_version", "default_dir",
           "describe_bucket", "describe_config", "device_name", "exact_shape", "human_age", "human_size",
           "pow2_ceil", "printable", "shape_bucket", "triton_version", "validate_config"]
