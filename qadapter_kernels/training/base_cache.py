"""A cached base pass for training: what the loss reads from the base model, computed once.

TRL's ``precompute_ref_log_probs`` pattern, for Q-Adapter. With the adapter off, the loss reads
from the base model at each position it scores or bootstraps from (docs/DESIGN.md §1-2):

- the final hidden state ``h_b``, which enters ``h_c = (h_q + alpha_0 h_b) / alpha_tilde``, and
- ``LSE(L) = logsumexp(W h_b + b)``, the value's ``- alpha_0 * LSE(L)`` term.

Given both, the step skips the base decoder pass and forms only the combined logits ``W h_c + b'``
(one head product per W tile instead of two). The positions are, per row, the last prompt token
and every response token: ``bellman`` scores t when ``loss_mask[t + 1]`` and bootstraps from
``V[t + 1]``; ``advantage`` scores the same t and bootstraps from ``V[t]``; ``official`` scores and
bootstraps at t when ``loss_mask[t]``; so none reads a
prompt position before the last one, nor padding. The collator puts zeros elsewhere, which the
pair pass multiplies by zero.

The cache is one safetensors file, written in a single streaming pass (tmp file + ``os.replace``)
and read memory-mapped. Its name is the digest of its key; the key is also stored in the file and
compared on load, so a stale cache is never reused: it names the model (config and a digest of
every base weight), the tokenizer, the tokenized data (a digest of every token id, and the
tokenization limits), the parameter dtype and the autocast dtype of the pass.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import safetensors
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .data import PreferenceCollator, TokenizedPair

FORMAT = "qadapter-base-cache/1"
BYTES_PER_GB = 10**9
# Rows per logsumexp chunk: bounds the [rows, V] fp32 logits the cache builder holds at once.
_LSE_CHUNK_ROWS = 256
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float64: "F64", torch.bfloat16: "BF16", torch.float16: "F16",
                       torch.int64: "I64"}


class BaseCacheTooLarge(ValueError):
    """The cache would pass the user's ``base_cache_max_gb`` limit (or the free disk space)."""


def default_cache_dir() -> Path:
    """``$QADAPTER_CACHE_DIR/base_cache``, else ``~/.cache/qadapter_kernels/base_cache``."""
    root = os.environ.get("QADAPTER_CACHE_DIR")
    return (Path(root) if root else Path.home() / ".cache" / "qadapter_kernels") / "base_cache"


# --------------------------------------------------------------------------- the key


def _digest_tensor(h, name: str, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
    h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def weights_digest(causal_lm: torch.nn.Module) -> str:
    """blake2b of every parameter and buffer of the base model; LoRA parameters (``lora_``) are left
    out, so training the adapter (or resuming it) keeps the key."""
    h = hashlib.blake2b(digest_size=20)
    with torch.no_grad():
        for name, t in [*causal_lm.named_parameters(), *causal_lm.named_buffers()]:
            if "lora_" not in name:
                _digest_tensor(h, name, t)
    return h.hexdigest()


def tokens_digest(pairs: Sequence[TokenizedPair]) -> str:
    """blake2b of every token id of every pair, in order (the exact input of the cached pass)."""
    h = hashlib.blake2b(digest_size=20)
    for pair in map(pairs.__getitem__, range(len(pairs))):
        h.update(json.dumps([pair.prompt_ids, pair.chosen_ids, pair.rejected_ids]).encode())
    return h.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str | None:
    """Digest of the vocabulary, special tokens and chat template; None without a tokenizer."""
    if tokenizer is None:
        return None
    described = [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                 getattr(tokenizer, "special_tokens_map", None), getattr(tokenizer, "chat_template", None)]
    return hashlib.blake2b(json.dumps(described, sort_keys=True, default=str).encode(), digest_size=20).hexdigest()


def cache_key(model, pairs: Sequence[TokenizedPair], tokenization: dict | None, tokenizer,
              autocast_dtype: torch.dtype | None) -> dict:
    """Everything the cached tensors are a function of (see the module docstring)."""
    causal_lm = model.base_causal_lm
    config = json.loads(causal_lm.config.to_json_string(use_diff=False))
    config.pop("_name_or_path", None)  # where the model was loaded from: the weights digest says what it is
    return {
        "format": FORMAT,
        "model_config": config,
        "weights": weights_digest(causal_lm),
        "dtype": str(model.lm_head.weight.dtype),
        "autocast_dtype": None if autocast_dtype is None else str(autocast_dtype),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "tokenization": tokenization,
        "pairs": len(pairs),
        "tokens": tokens_digest(pairs),
    }


def key_digest(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------- layout


def cached_span(prompt_len: int, response_len: int) -> tuple[int, int]:
    """[start, stop) of the positions of one row the loss reads: the last prompt token and the response."""
    return prompt_len - 1, prompt_len + response_len


def row_lengths(pairs: Sequence[TokenizedPair]) -> list[int]:
    """Cached positions per row, rows in pair order (pair i: chosen row 2i, rejected row 2i + 1)."""
    lengths = []
    for pair in map(pairs.__getitem__, range(len(pairs))):
        for response in (pair.chosen_ids, pair.rejected_ids):
            start, stop = cached_span(len(pair.prompt_ids), len(response))
            lengths.append(stop - start)
    return lengths


@dataclass(frozen=True)
class CacheLayout:
    """Where each tensor lies in the file: safetensors' header, then hidden [P, H], lse [P], row_offsets [2N + 1]."""

    positions: int
    hidden_size: int
    hidden_dtype: torch.dtype
    lse_dtype: torch.dtype
    rows: int

    def entries(self) -> list[tuple[str, torch.dtype, list[int]]]:
        return [("hidden", self.hidden_dtype, [self.positions, self.hidden_size]),
                ("lse", self.lse_dtype, [self.positions]), ("row_offsets", torch.int64, [self.rows + 1])]

    def header(self, metadata: dict[str, str]) -> bytes:
        tensors, offset = {"__metadata__": metadata}, 0
        for name, dtype, shape in self.entries():
            size = torch.Size(shape).numel() * torch.empty(0, dtype=dtype).element_size()
            tensors[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
        header = json.dumps(tensors).encode()
        return header + b" " * (-len(header) % 8)  # the data starts 8-byte aligned

    def data_bytes(self) -> int:
        return sum(torch.Size(s).numel() * torch.empty(0, dtype=d).element_size() for _, d, s in self.entries())


def size_line(layout: CacheLayout, pairs: int, path: Path) -> str:
    gb = layout.data_bytes() / BYTES_PER_GB
    return (f"base cache: {pairs} pairs, {layout.positions} positions x {layout.hidden_size} "
            f"({str(layout.hidden_dtype).replace('torch.', '')}) = {gb:.3f} GB -> {path}")


# --------------------------------------------------------------------------- building


def _check_room(layout: CacheLayout, directory: Path, max_gb: float | None) -> None:
    needed = layout.data_bytes()
    if max_gb is not None and needed > max_gb * BYTES_PER_GB:
        raise BaseCacheTooLarge(
            f"the base cache needs {needed / BYTES_PER_GB:.3f} GB, more than base_cache_max_gb = {max_gb:g} "
            f"(--cache-max-gb): raise the limit, shorten max_length, or train without the cache")
    free = shutil.disk_usage(directory).free
    if needed > free:
        raise BaseCacheTooLarge(f"the base cache needs {needed / BYTES_PER_GB:.3f} GB but base_cache_dir {directory} "
                                f"has {free / BYTES_PER_GB:.3f} GB free")


def base_lse(hidden: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    """LSE(W h + b) per row, accumulated in fp32 (fp64 for fp64 weights), a chunk of rows at a time."""
    weight, bias = head.weight, getattr(head, "bias", None)
    acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
    parts = [torch.logsumexp(torch.nn.functional.linear(chunk.to(acc), weight.to(acc),
                                                        None if bias is None else bias.to(acc)), -1)
             for chunk in hidden.split(_LSE_CHUNK_ROWS)]
    return torch.cat(parts) if parts else hidden.new_zeros(0, dtype=acc)


def _write_cache(model, pairs: Sequence[TokenizedPair], layout: CacheLayout, key: dict, path: Path,
                 batch_size: int, autocast: Callable[[], object]) -> None:
    """Runs the base pass over every pair and streams the tensors into ``path`` (tmp + os.replace)."""
    # Right padding under a causal mask: the pad id never reaches a cached position.
    collate = PreferenceCollator(pad_token_id=0)
    lengths = row_lengths(pairs)
    offsets = torch.tensor([0, *lengths]).cumsum(0)
    header = layout.header({"format": FORMAT, "key": json.dumps(key, sort_keys=True)})
    data_start = 8 + len(header)
    hidden_row = layout.hidden_size * torch.empty(0, dtype=layout.hidden_dtype).element_size()
    lse_start = data_start + layout.positions * hidden_row
    lse_item = torch.empty(0, dtype=layout.lse_dtype).element_size()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    device, head, was_training = model.lm_head.weight.device, model.lm_head, model.training
    model.eval()  # the base model as it decodes: no dropout sampled into the cache
    try:
        with open(tmp, "wb") as f, torch.no_grad(), model.peft_model.disable_adapter():
            f.write(len(header).to_bytes(8, "little") + header)
            f.seek(lse_start + layout.positions * lse_item)
            f.write(offsets.numpy().tobytes())
            bar = tqdm(total=len(pairs), desc="base cache", unit="pair")
            for first in range(0, len(pairs), batch_size):
                chunk = [pairs[j] for j in range(first, min(first + batch_size, len(pairs)))]
                batch = collate(chunk)
                with autocast():
                    hidden = model.final_hidden_states(batch["input_ids"].to(device), batch["attention_mask"].to(device))
                hidden = hidden.to(head.weight.dtype)  # what compute_loss hands the loss
                b = len(chunk)
                for i, pair in enumerate(chunk):
                    for side, (response, row) in enumerate(((pair.chosen_ids, i), (pair.rejected_ids, b + i))):
                        start, stop = cached_span(len(pair.prompt_ids), len(response))
                        states = hidden[row, start:stop]
                        index = 2 * (first + i) + side
                        f.seek(data_start + int(offsets[index]) * hidden_row)
                        f.write(states.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
                        f.seek(lse_start + int(offsets[index]) * lse_item)
                        f.write(base_lse(states, head).to(layout.lse_dtype).cpu().numpy().tobytes())
                bar.update(b)
            bar.close()
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)


def open_or_build(model, pairs: Sequence[TokenizedPair], *, tokenizer=None, tokenization: dict | None = None,
                  cache_dir: str | os.PathLike | None = None, max_gb: float | None = None, batch_size: int = 8,
                  autocast: Callable[[], object] = nullcontext,
                  log: Callable[[str], None] = print) -> "BaseCache":
    """The cache of ``pairs`` for ``model``: reused when a file with the same key exists, built otherwise.

    ``autocast``: a context factory the base pass runs under (the trainer's mixed precision), so
    the cached states are those the uncached step would compute. ``max_gb``: refuse (with
    :class:`BaseCacheTooLarge`) a cache larger than this many GB (10^9 bytes). The size is logged
    before anything is computed.
    """
    if not (hasattr(pairs, "__len__") and hasattr(pairs, "__getitem__")):
        raise TypeError(f"a cached base pass needs a map-style dataset (len and indexing), got {type(pairs).__name__}")
    if max_gb is not None and (isinstance(max_gb, bool) or not isinstance(max_gb, (int, float)) or not max_gb > 0):
        raise ValueError(f"base_cache_max_gb must be a positive number or None, got {max_gb!r}")
    directory = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)
    device_type = model.lm_head.weight.device.type
    with autocast():
        autocast_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    key = cache_key(model, pairs, tokenization, tokenizer, autocast_dtype)
    path = directory / f"base-{key_digest(key)}.safetensors"
    weight = model.lm_head.weight
    layout = CacheLayout(sum(row_lengths(pairs)), weight.shape[1], weight.dtype,
                         torch.float64 if weight.dtype == torch.float64 else torch.float32, 2 * len(pairs))
    if path.is_file():
        try:
            cache = BaseCache(path, key)
            log(f"base cache: reusing {path}")
            return cache
        except StaleBaseCache as e:
            log(f"base cache: rebuilding {path} ({e})")
    log(size_line(layout, len(pairs), path))
    _check_room(layout, directory, max_gb)
    _write_cache(model, pairs, layout, key, path, batch_size, autocast)
    return BaseCache(path, key)


# --------------------------------------------------------------------------- reading


class StaleBaseCache(ValueError):
    """A cache file that is not the cache of this key (or not a cache file at all)."""


class BaseCache:
    """A built cache, memory-mapped; ``row(i)`` -> (hidden [n, H], lse [n]) of row i (pair i // 2, chosen first)."""

    def __init__(self, path: str | os.PathLike, key: dict | None = None):
        self.path = Path(path)
        try:
            self._file = safetensors.safe_open(str(self.path), framework="pt")
            metadata = self._file.metadata() or {}
        except Exception as e:  # safetensors raises its own error types for a truncated or foreign file
            raise StaleBaseCache(f"unreadable: {e}") from None
        if metadata.get("format") != FORMAT:
            raise StaleBaseCache(f"not a {FORMAT} file")
        self.key = json.loads(metadata["key"])
        if key is not None and self.key != key:
            changed = sorted(k for k in set(key) | set(self.key) if key.get(k) != self.key.get(k))
            raise StaleBaseCache(f"its key differs in {', '.join(changed)}")
        self.row_offsets = self._file.get_tensor("row_offsets")
        self._hidden = self._file.get_slice("hidden")
        self._lse = self._file.get_slice("lse")

    def __len__(self) -> int:
        return self.row_offsets.numel() - 1

    def row(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = int(self.row_offsets[index]), int(self.row_offsets[index + 1])
        return self._hidden[start:stop], self._lse[start:stop]


@dataclass(frozen=True)
class CachedPair:
    """A tokenized pair with its rows' cached base states (chosen, rejected)."""

    pair: TokenizedPair
    base_rows: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class CachedBaseDataset(Dataset):
    """``pairs`` (a dataset of :class:`TokenizedPair`) with each item's cached base rows attached."""

    def __init__(self, pairs: Sequence[TokenizedPair], cache: BaseCache):
        if len(cache) != 2 * len(pairs):
            raise StaleBaseCache(f"{cache.path} holds {len(cache) // 2} pairs, the dataset {len(pairs)}")
        self.pairs, self.cache = pairs, cache

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> CachedPair:
        return CachedPair(self.pairs[index], (self.cache.row(2 * index), self.cache.row(2 * index + 1)))


class CachedBaseCollator:
    """``PreferenceCollator``'s batch plus ``base_hidden`` [2B, T, H] and ``base_lse`` [2B, T] (zeros
    outside the cached positions); plain :class:`TokenizedPair` items get the plain batch."""

    def __init__(self, collator: Callable[[Sequence[TokenizedPair]], dict]):
        self.collator = collator

    def __call__(self, items: Sequence[CachedPair | TokenizedPair]) -> dict[str, torch.Tensor]:
        if not items or not isinstance(items[0], CachedPair):
            return self.collator(items)
        batch = self.collator([item.pair for item in items])
        rows, width = batch["input_ids"].shape
        first_hidden, first_lse = items[0].base_rows[0]
        hidden = first_hidden.new_zeros(rows, width, first_hidden.shape[-1])
        lse = first_lse.new_zeros(rows, width)
        b = len(items)
        for i, item in enumerate(items):
            for row, response, (states, sums) in ((i, item.pair.chosen_ids, item.base_rows[0]),
                                                  (b + i, item.pair.rejected_ids, item.base_rows[1])):
                start, stop = cached_span(len(item.pair.prompt_ids), len(response))
                hidden[row, start:stop] = states
                lse[row, start:stop] = sums
        return {**batch, "base_hidden": hidden, "base_lse": lse}
