"""How much memory one replica of a GGUF model needs, read from the file's header.

The estimate mirrors what llama.cpp's llama-server allocates:

- weights: the sum of the tensor data sizes in the file (llama.cpp keeps the token
  embedding in host memory when it offloads, so this slightly over-counts a GPU);
- KV cache: for every layer that owns a cache, cells × n_kv_heads × (key_length +
  value_length) × bytes per element of the cache type. Our ``ModelConfig.ctx`` is the
  context *per slot*; llama-server's ``--ctx-size`` is the total that it splits across
  ``--parallel`` slots, so the backend passes ``ctx × slots`` and a full-attention layer
  holds ``ctx × slots`` cells. A sliding-window layer (gemma2/3, cohere2, gpt-oss, ...)
  holds, per slot, ``min(ctx, window + n_ubatch)`` cells padded to 256, as llama.cpp's
  ``llama_kv_cache_iswa`` does without ``--swa-full`` (non-unified cache);
- compute: a heuristic for llama.cpp's compute buffer with flash attention on (the
  default on CUDA): the graph allocator reuses memory, so the peak is the widest f32
  activation of one micro-batch: ``4 B × n_ubatch × (max(n_vocab, 3 × n_ff) + 2 × n_embd)``
  — the logits of a full micro-batch, or the FFN's gate/up/activation, plus the residual
  stream (Llama 3 8B: 266 MiB, of which 250 MiB are logits). The cost of a split over
  several GPUs (each has its own buffer and CUDA context) is ``Estimate.per_extra_gpu``;
- margin: 5 % of the above plus 512 MiB for the CUDA context and cuBLAS workspace that
  every engine process pays on each GPU it touches (:data:`GPU_CONTEXT_BYTES`).
"""

from __future__ import annotations

import math
import mmap
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MiB = 1024**2
GiB = 1024**3

N_UBATCH = 512                 # llama-server's default --ubatch-size
GPU_CONTEXT_BYTES = 512 * MiB  # CUDA context + cuBLAS workspace, per process per GPU
MARGIN_FRACTION = 0.05
SWA_PAD = 256                  # llama.cpp pads the sliding-window cache to 256 cells

# Cache types llama-server accepts for --cache-type-k/-v: (block size, bytes per block).
CACHE_TYPES: Mapping[str, tuple[int, int]] = {
    "f32": (1, 4),
    "f16": (1, 2),
    "bf16": (1, 2),
    "q8_0": (32, 34),
    "q4_0": (32, 18),
    "q4_1": (32, 20),
    "iq4_nl": (32, 18),
    "q5_0": (32, 22),
    "q5_1": (32, 24),
}

# Architectures whose GGUF states a sliding window but not which layers use it: llama.cpp
# hard-codes a period (src/models/*.cpp, set_swa_pattern with dense_first = false: the last
# layer of each period attends to everything). Any other architecture that states no
# pattern is counted with full-size caches on every layer (llama.cpp runs it that way).
SWA_PERIODS: Mapping[str, int] = {
    "gemma2": 2,
    "gemma3": 6,
    "gemma3n": 5,
    "gemma-embedding": 6,
    "cohere2": 4,
    "exaone4": 4,
    "gpt-oss": 2,
}


class EstimateError(ValueError):
    """The GGUF header lacks what the estimate needs."""


@dataclass(frozen=True)
class Estimate:
    """Bytes one replica needs: weights, KV cache, compute buffers and a safety margin."""

    weights: int
    kv_cache: int
    compute: int
    margin: int
    n_layers: int

    @property
    def total(self) -> int:
        """All of it together."""
        return self.weights + self.kv_cache + self.compute + self.margin

    @property
    def per_extra_gpu(self) -> int:
        """What splitting over one more GPU adds: its own compute buffer and CUDA context."""
        return self.compute + GPU_CONTEXT_BYTES


@dataclass(frozen=True)
class GGUFHeader:
    """What the estimate reads from a GGUF file: metadata, tensor bytes, vocabulary size."""

    metadata: Mapping[str, Any]   # every key but the tokenizer's arrays; arrays as tuples
    tensor_bytes: int
    n_vocab: int = 0              # from token_embd.weight, else {arch}.vocab_size / tokens

    @property
    def arch(self) -> str:
        """The general.architecture value."""
        return str(self.metadata.get("general.architecture", ""))


def format_bytes(n: float) -> str:
    """Render a byte count for people: 1.5 GiB, 256.0 MiB, 12 B."""
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, size in (("TiB", 1024**4), ("GiB", GiB), ("MiB", MiB), ("KiB", 1024)):
        if n >= size:
            return f"{sign}{n / size:.1f} {unit}"
    return f"{sign}{int(n)} B"


def read_gguf_header(path: Path) -> GGUFHeader:
    """Read the metadata and tensor sizes of a GGUF file; no tensor data is touched.

    A small reader of its own rather than gguf.GGUFReader, which decodes every tokenizer
    string into numpy arrays (15 s for Gemma 3's 262k-token vocabulary); the gguf package
    supplies the tensor types' sizes, and the tests check both readers agree.
    """
    try:
        with path.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _GGUFParser(buf, str(path)).parse()
    except ValueError as e:  # mmap of an empty file
        if isinstance(e, EstimateError):
            raise
        raise EstimateError(f"{path}: not a GGUF file ({e})") from None


def estimate_gguf(path: Path, ctx: int, slots: int, cache_type: str = "f16") -> Estimate:
    """Estimate one replica of the GGUF model at ``path``; ``ctx`` is the context per slot."""
    return estimate_from_header(read_gguf_header(path), ctx, slots, cache_type)


def estimate_from_header(
    header: GGUFHeader, ctx: int, slots: int, cache_type: str = "f16"
) -> Estimate:
    """Estimate one replica from a parsed header; ``ctx`` is the context per slot."""
    if ctx < 1:
        raise EstimateError(f"ctx must be at least 1, got {ctx}")
    if slots < 1:
        raise EstimateError(f"slots must be at least 1, got {slots}")
    if cache_type not in CACHE_TYPES:
        known = ", ".join(CACHE_TYPES)
        raise EstimateError(f"unknown cache type {cache_type!r} (known: {known})")
    arch = header.arch
    if not arch:
        raise EstimateError("GGUF header has no general.architecture")
    meta = header.metadata

    def key(name: str) -> Any:
        return meta.get(f"{arch}.{name}")

    n_layers = _as_int(key("block_count"), f"{arch}.block_count")
    n_embd = _as_int(key("embedding_length"), f"{arch}.embedding_length")
    n_head = _per_layer(key("attention.head_count"), n_layers, f"{arch}.attention.head_count")
    head_count_kv = key("attention.head_count_kv")
    n_head_kv = n_head if head_count_kv is None else _per_layer(
        head_count_kv, n_layers, f"{arch}.attention.head_count_kv"
    )
    max_head = max(n_head) if n_head else 0
    default_head_dim = n_embd // max_head if max_head else 0
    key_len = _opt_int(key("attention.key_length"), default_head_dim)
    value_len = _opt_int(key("attention.value_length"), default_head_dim)
    key_len_swa = _opt_int(key("attention.key_length_swa"), key_len)
    value_len_swa = _opt_int(key("attention.value_length_swa"), value_len)
    # MLA (deepseek2 and kin): the cache holds the compressed K only, V is a view of it.
    is_mla = (
        key("attention.key_length_mla") is not None
        and key("attention.value_length_mla") is not None
    )

    is_swa = _swa_layers(arch, meta, n_layers)
    window = _opt_int(key("attention.sliding_window"), 0)
    # Layers past block_count - shared_kv_layers reuse an earlier layer's cache.
    n_layers_kv = n_layers - _opt_int(key("attention.shared_kv_layers"), 0)

    block, block_bytes = CACHE_TYPES[cache_type]

    def row_bytes(elements: int) -> int:
        return math.ceil(elements / block) * block_bytes

    full_cells = ctx * slots
    swa_cells = slots * _pad(min(ctx, window + N_UBATCH), SWA_PAD) if window else full_cells
    kv_cache = 0
    for il in range(max(0, n_layers_kv)):
        heads = n_head_kv[il]
        if heads == 0:  # a recurrent layer of a hybrid model: no KV cache
            continue
        swa = is_swa[il] and window > 0
        k_len, v_len = (key_len_swa, value_len_swa) if swa else (key_len, value_len)
        per_cell = row_bytes(heads * k_len) + (0 if is_mla else row_bytes(heads * v_len))
        kv_cache += per_cell * (swa_cells if swa else full_cells)

    n_vocab = header.n_vocab or _opt_int(key("vocab_size"), 0)
    n_ff = max(_per_layer(key("feed_forward_length") or 0, n_layers, "feed_forward_length"),
               default=0)
    compute = 4 * N_UBATCH * (max(n_vocab, 3 * n_ff) + 2 * n_embd)

    subtotal = header.tensor_bytes + kv_cache + compute
    margin = math.ceil(subtotal * MARGIN_FRACTION) + GPU_CONTEXT_BYTES
    return Estimate(
        weights=header.tensor_bytes,
        kv_cache=kv_cache,
        compute=compute,
        margin=margin,
        n_layers=n_layers,
    )


def _swa_layers(arch: str, meta: Mapping[str, Any], n_layers: int) -> list[bool]:
    """Which layers use a sliding window, as llama.cpp's set_swa_pattern decides."""
    if not meta.get(f"{arch}.attention.sliding_window"):
        return [False] * n_layers
    pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    if isinstance(pattern, Sequence) and not isinstance(pattern, str):
        flags = [bool(x) for x in pattern]
        return (flags + [False] * n_layers)[:n_layers]
    period = int(pattern) if isinstance(pattern, int) else SWA_PERIODS.get(arch, 1)
    if period == 0:  # every layer slides
        return [True] * n_layers
    return [il % period < period - 1 for il in range(n_layers)]


def _pad(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _as_int(value: Any, name: str) -> int:
    if value is None:
        raise EstimateError(f"GGUF header has no {name}")
    if isinstance(value, Sequence) and not isinstance(value, str):
        raise EstimateError(f"GGUF header {name}: expected an integer, got an array")
    return int(value)


def _opt_int(value: Any, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, Sequence) and not isinstance(value, str):
        return max((int(v) for v in value), default=default)
    return int(value)


def _per_layer(value: Any, n_layers: int, name: str) -> list[int]:
    """A per-layer value that the header may give as one integer or as an array."""
    if value is None:
        raise EstimateError(f"GGUF header has no {name}")
    if isinstance(value, Sequence) and not isinstance(value, str):
        values = [int(v) for v in value]
        if len(values) < n_layers:
            raise EstimateError(
                f"GGUF header {name}: {len(values)} values for {n_layers} layers"
            )
        return values[:n_layers]
    return [int(value)] * n_layers


# GGUF value types (gguf.GGUFValueType) -> struct format of a scalar.
_SCALARS: Mapping[int, str] = {
    0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d",
}
_STRING, _ARRAY = 8, 9
_GGUF_MAGIC = b"GGUF"


class _GGUFParser:
    """Walks a GGUF header (format versions 2 and 3, either byte order) in a buffer."""

    def __init__(self, buf: mmap.mmap, name: str) -> None:
        self.buf = buf
        self.name = name
        self.off = 0
        self.order = "<"

    def parse(self) -> GGUFHeader:
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType  # heavy: numpy

        if self.buf[:4] != _GGUF_MAGIC:
            raise EstimateError(f"{self.name}: not a GGUF file (bad magic)")
        self.off = 4
        try:
            version = self._unpack("I")
            if version & 0xFFFF == 0:  # written on a machine of the other byte order
                self.order = ">"
                self.off = 4
                version = self._unpack("I")
            if version not in (2, 3):
                raise EstimateError(f"{self.name}: unsupported GGUF version {version}")
            n_tensors = self._unpack("Q")
            n_kv = self._unpack("Q")
            metadata: dict[str, Any] = {}
            n_tokens = 0
            for _ in range(n_kv):
                key = self._string()
                vtype = self._unpack("I")
                if key.startswith("tokenizer.") and vtype == _ARRAY:
                    count = self._skip_array()
                    if key == "tokenizer.ggml.tokens":
                        n_tokens = count
                else:
                    metadata[key] = self._value(vtype)
            tensor_bytes = 0
            n_vocab = 0
            for _ in range(n_tensors):
                tname = self._string()
                n_dims = self._unpack("I")
                dims = [self._unpack("Q") for _ in range(n_dims)]
                ttype = self._unpack("I")
                self._unpack("Q")  # data offset
                try:
                    block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
                except (ValueError, KeyError):
                    raise EstimateError(
                        f"{self.name}: tensor {tname} has unknown type {ttype}"
                    ) from None
                tensor_bytes += math.prod(dims) // block * type_size
                if tname == "token_embd.weight" and n_dims >= 2:
                    n_vocab = dims[1]
        except (struct.error, IndexError, UnicodeDecodeError):
            raise EstimateError(f"{self.name}: truncated or corrupt GGUF header") from None
        return GGUFHeader(
            metadata=metadata, tensor_bytes=tensor_bytes, n_vocab=n_vocab or n_tokens
        )

    def _unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(self.order + fmt, self.buf, self.off)[0]
        self.off += struct.calcsize(fmt)
        return value

    def _string(self) -> str:
        length = self._unpack("Q")
        end = self.off + length
        if end > len(self.buf):
            raise IndexError("string past end of file")
        text = self.buf[self.off:end].decode("utf-8")
        self.off = end
        return text

    def _value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self._string()
        if vtype == _ARRAY:
            itype = self._unpack("I")
            count = self._unpack("Q")
            return tuple(self._value(itype) for _ in range(count))
        fmt = _SCALARS.get(vtype)
        if fmt is None:
            raise EstimateError(f"{self.name}: unknown GGUF value type {vtype}")
        return self._unpack(fmt)

    def _skip_array(self) -> int:
        itype = self._unpack("I")
        count: int = self._unpack("Q")
        if itype == _STRING:
            for _ in range(count):
                self.off += 8 + self._unpack("Q")
        elif itype in _SCALARS:
            self.off += count * struct.calcsize(_SCALARS[itype])
        else:
            for _ in range(count):
                self._value(itype)
        if self.off > len(self.buf):
            raise IndexError("array past end of file")
        return count
