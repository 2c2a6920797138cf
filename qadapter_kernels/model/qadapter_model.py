"""Q-Adapter model: a transformers causal LM, a peft LoRA adapter, and the fused loss.

Q_R is the LM-head output of the model with the adapter on, pi_1 the same model with it off
(docs/DESIGN.md §1). Both passes stop at the decoder's final hidden states; the shared, frozen LM
head is applied inside ``fused_linear_qadapter_loss``, so no [N, V] logits tensor is built.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import uuid
import warnings
from collections.abc import Mapping
from pathlib import Path

import peft
import safetensors.torch
import torch
from transformers import PreTrainedModel

from ..api import fused_linear_qadapter_loss
from .. import decoding
from ..loading import load_base_model
from ..logit_identity import post_head_logit_change
from ..outputs import QAdapterLossOutput
from .adapter_files import adapter_weights_file, check_adapter_state, check_finite_lora, saved_tensor_shapes
from .config import QAdapterConfig
from .sharded_state import whole_parameters

QADAPTER_CONFIG_NAME = "qadapter_config.json"


def _find_decoder(causal_lm: torch.nn.Module) -> torch.nn.Module:
    """The module mapping input ids to the final (normalised) hidden states the LM head reads."""
    if not callable(getattr(causal_lm, "get_output_embeddings", None)) or causal_lm.get_output_embeddings() is None:
        raise ValueError(
            f"{type(causal_lm).__name__} has no LM head (get_output_embeddings() is None): Q-Adapter needs a causal "
            "LM such as LlamaForCausalLM, not a bare decoder such as LlamaModel"
        )
    # get_decoder() is the transformers accessor (LlamaForCausalLM.model, GPT2LMHeadModel.transformer,
    # the language model of a multimodal model); it returns the model itself when it finds none.
    decoder = causal_lm.get_decoder() if callable(getattr(causal_lm, "get_decoder", None)) else None
    if decoder is None or decoder is causal_lm:
        raise ValueError(
            f"cannot find the decoder of {type(causal_lm).__name__} (get_decoder() gives no submodule): "
            "Q-Adapter needs the final hidden states before the LM head"
        )
    # The fused loss applies the LM head alone, so such models would silently get a different Q.
    change = post_head_logit_change(getattr(causal_lm, "config", None))
    if change is not None:
        raise NotImplementedError(
            f"{type(causal_lm).__name__} transforms its logits after the LM head ({change[0]}={change[1]}); "
            "the fused loss applies the LM head alone"
        )
    return decoder


class QAdapterModel(torch.nn.Module):
    """A causal LM with a LoRA adapter trained as the Q-Adapter residual Q-function.

    Only the LoRA parameters are trainable; the LM head is shared by both passes and frozen.
    ``causal_lm`` is modified in place (peft injects the LoRA layers into it). It may also be a
    ``peft.PeftModel`` that already holds the adapter (``from_pretrained`` passes one); its LoRA
    settings then win over the ``lora_*`` fields of ``config``; or a model path or name, loaded with
    ``loading.load_base_model`` (``"embedded"``: the SmolLM2-135M-Instruct shipped with the package).
    """

    def __init__(self, causal_lm: PreTrainedModel | peft.PeftModel | str | os.PathLike,
                 config: QAdapterConfig | None = None):
        super().__init__()
        config = (config or QAdapterConfig()).validate()
        if isinstance(causal_lm, (str, os.PathLike)):
            if config.base_model is None:  # the name as given ("embedded" stays portable across machines)
                config = dataclasses.replace(config, base_model=str(causal_lm))
            causal_lm = load_base_model(causal_lm)
        base = causal_lm.get_base_model() if isinstance(causal_lm, peft.PeftModel) else causal_lm
        self._decoder_path = self._module_path(base, _find_decoder(base))
        if config.base_model is None and getattr(base, "name_or_path", ""):
            config = dataclasses.replace(config, base_model=str(base.name_or_path))
        self.qadapter_config = config
        # Read by accelerate's FSDP transformer auto-wrap policy: one shard group per decoder layer.
        self._no_split_modules = list(getattr(base, "_no_split_modules", None) or [])
        if isinstance(causal_lm, peft.PeftModel):
            self.peft_model = causal_lm
        else:
            self.peft_model = peft.get_peft_model(causal_lm, config.lora_config())
        # The config of every loaded adapter; the active one's is ``qadapter_config``.
        self.adapter_configs = {self.peft_model.active_adapter: config}
        for param in self.lm_head.parameters():  # frozen even if the caller had it trainable
            param.requires_grad_(False)

    @staticmethod
    def _module_path(root: torch.nn.Module, module: torch.nn.Module) -> str:
        # A path, not the module: stored as an attribute, the module would be registered twice.
        for name, candidate in root.named_modules():
            if candidate is module:
                return name
        raise ValueError("get_decoder() returned a module outside the model")

    @property
    def base_causal_lm(self) -> PreTrainedModel:
        """The wrapped transformers model (with the LoRA layers injected)."""
        return self.peft_model.get_base_model()

    @property
    def adapter_names(self) -> tuple[str, ...]:
        """The adapters loaded in this model: the trained (active) one first, then ``load_adapter``'s."""
        return tuple(self.adapter_configs)

    @property
    def decoder(self) -> torch.nn.Module:
        return self.base_causal_lm.get_submodule(self._decoder_path)

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.base_causal_lm.get_output_embeddings()

    def final_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states [2B, T, H] with the adapter as it is now set."""
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out[0]  # last_hidden_state, whether the decoder returns a ModelOutput or a tuple

    def compute_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                     base_hidden: torch.Tensor | None = None, base_lse: torch.Tensor | None = None
                     ) -> QAdapterLossOutput:
        """The Q-Adapter loss of a batch of 2B rows (B chosen, then B rejected; docs/DESIGN.md §2).

        ``base_hidden`` [2B, T, H] and ``base_lse`` [2B, T]: the base model's final hidden states
        and LSE(L) from a cached base pass (``training.base_cache``), both or neither. With them the
        base decoder pass is skipped and the loss forms one head product per tile instead of two.
        """
        if (base_hidden is None) != (base_lse is None):
            raise ValueError("base_hidden and base_lse come together (a cached base pass gives both), got only "
                             + ("base_hidden" if base_lse is None else "base_lse"))
        adapter_hidden = self.final_hidden_states(input_ids, attention_mask)
        if base_hidden is None:
            with torch.no_grad(), self.peft_model.disable_adapter():
                base_hidden = self.final_hidden_states(input_ids, attention_mask)
        head = self.lm_head
        weight, bias = whole_parameters(head.weight, getattr(head, "bias", None))
        # Under autocast the hidden states may come out in another dtype than the head's weight.
        return fused_linear_qadapter_loss(
            adapter_hidden.to(weight.dtype), base_hidden.to(weight.dtype), weight, input_ids, loss_mask,
            lm_head_bias=bias, tile_budget_mb=self.qadapter_config.tile_budget_mb, base_lse=base_lse,
            **self.qadapter_config.loss_kwargs(),
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, loss_mask: torch.Tensor,
                base_hidden: torch.Tensor | None = None, base_lse: torch.Tensor | None = None) -> QAdapterLossOutput:
        """Same as ``compute_loss``; the explicit signature also tells ``transformers.Trainer``
        which batch columns to keep (``loss_mask`` and the cached base columns included)."""
        return self.compute_loss(input_ids, attention_mask, loss_mask, base_hidden, base_lse)

    # ------------------------------------------------------------------ decoding

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 64, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
                 top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                 generator: torch.Generator | int | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, stop_strings: str | list[str] | None = None, tokenizer=None,
                 two_pass: bool = False, adapter: bool = True, streamer=None,
                 adapters: dict[str, float | torch.Tensor] | None = None,
                 return_log_probs: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Samples from the customised policy ``(Q + alpha_0 * log_softmax(L)) / alpha_tilde``.

        Returns ``[B, T + n]`` token ids like transformers' ``generate``: the prompt (with its
        padding) then the n <= ``max_new_tokens`` new tokens; a row that ended (EOS or a stop
        string) is filled with ``pad_token_id`` while the others go on. Each token costs ONE
        forward over a mixed batch of 2B rows (adapter rows and peft ``"__base__"`` rows, one KV
        cache), then ``combined_sample_from_hidden`` on the last hidden states, so neither logits
        row is ever stored.

        Args:
            input_ids: ``[B, T]`` prompts, left-padded.
            attention_mask: ``[B, T]``, 0 on the padding.
            temperature: as in ``qk.combined_sample`` (0 is greedy); like ``top_k``, ``top_p`` and
                ``min_p``, applied in Hugging Face's order, a Python scalar or a per-row ``[B]`` tensor.
            top_k: as in ``qk.combined_sample``.
            top_p: as in ``qk.combined_sample``.
            min_p: as in ``qk.combined_sample``.
            generator: a ``torch.Generator`` or an int seed: the same seed gives the same tokens.
            eos_token_id: the id or ids that end a row (any of them); defaults to the model's
                generation config, else its config, else ``tokenizer``'s.
            pad_token_id: fills the rows that have ended; same defaults as ``eos_token_id``.
            stop_strings: a row also stops once its generated text contains one of these (needs
                ``tokenizer``); the tokens that completed it are kept, as in transformers.
            two_pass: the authors' scheme instead (a forward with the adapter and one without per
                token, two KV caches); same distribution, for comparison.
            adapter: False samples from the base model alone (adapter off), for side-by-side comparisons.
            streamer: an object with ``put(ids)`` and ``end()`` (e.g. ``transformers.TextStreamer``)
                that receives the prompt, then each step's new tokens ``[B]``.
            adapters: ``{name: weight}`` composes several loaded adapters (``adapter_names``):
                ``pi~ ∝ exp((sum_i w_i Q_i + alpha_0 log pi_1) / alpha_tilde)``, an approximation of an
                adapter trained on the weighted sum of their preferences. A weight is a number or a
                per-row ``[B]`` tensor; 0 turns that adapter off (all 0: the base policy at temperature
                ``alpha_tilde / alpha_0``); every row needs ``sum(weights) + alpha_0 > 0``. One forward
                over K + 1 row groups per token and one head product (docs/DESIGN.md §1).
            return_log_probs: also return ``[B, n]`` fp32 log-probabilities of the new tokens under
                the customised policy itself, ``log softmax(z)`` before temperature and filtering
                (what scoring compares; the base policy's with ``adapter=False``), one fused LM-head
                pass per token on the hidden states; 0 where a row had already ended (pad), so a
                row's sum is its sequence's log-probability. Returns ``(ids, log_probs)`` then.
        """
        return decoding.generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens,
                                 temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, generator=generator,
                                 eos_token_id=eos_token_id, pad_token_id=pad_token_id, stop_strings=stop_strings,
                                 tokenizer=tokenizer, two_pass=two_pass, adapter=adapter, streamer=streamer,
                                 adapters=adapters, return_log_probs=return_log_probs)

    def generate_text(self, tokenizer, prompts: str | list, **kwargs) -> str | list[str]:
        """``generate`` with strings: prompt(s) in, the new text(s) out.

        ``prompts``: a string, a conversation (list of ``{"role", "content"}``), or a list of those.
        Each is written in the prompt format the adapter was trained on (its config's
        ``prompt_format``; ``prompt_format=`` overrides it: a bare question becomes an HH-RLHF turn
        for ``"hh_dialogue"``, stays plain text for ``"plain_text"``; a prompt in another format is
        kept, with a warning naming both) and encoded as training encodes prompts
        (``prompts.encode_prompt``: the chat template with the generation prompt when the tokenizer has
        one), left-padded into one batch. The new tokens are decoded without special tokens and cut
        before the first stop string. ``kwargs``: those of ``generate``.
        """
        return decoding.generate_text(self, tokenizer, prompts, **kwargs)

    def encode_prompt(self, tokenizer, prompt: str | list, prompt_format: str | None = None) -> list[int]:
        """The token ids ``generate_text`` feeds for ``prompt`` (one string or conversation): written in the
        prompt format the adapter was trained on, encoded as training encodes prompts. What to give
        ``generate`` and ``QAdapterLogitsProcessor``, which take token ids."""
        return decoding.encode_prompt_as_trained(self, tokenizer, prompt, prompt_format)

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Called by ``transformers.Trainer`` for ``gradient_checkpointing=True``."""
        self.base_causal_lm.activation_checkpointing_enable(**kwargs)

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Writes a peft adapter folder (safetensors) plus ``qadapter_config.json``, atomically.

        Everything is written to a temporary folder first (inside ``directory`` when it exists,
        beside it otherwise); then the files are moved in with ``os.replace``, so an interrupted
        save leaves any earlier save whole.
        Files already in ``directory`` that are not ours (a Trainer checkpoint's optimizer state)
        are kept. ``state_dict``: a full state dict of this module to save from instead of the
        live parameters (what ``Trainer`` passes under FSDP / DeepSpeed).
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:
            prefix = "peft_model."
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        # Not tempfile.mkdtemp: its 0700 mode would stick to a folder renamed into place. Inside an
        # existing folder, so that what a kill leaves is found there (training.checkpoints.leftovers).
        suffix = f".saving-{uuid.uuid4().hex[:12]}"
        if directory.is_dir():
            staging = directory / f".adapter{suffix}"
        else:
            staging = directory.parent / f".{directory.name}{suffix}"
        staging.mkdir()
        try:
            # No embedding-layer copy: the vocabulary is never resized (and peft's check for it warns on every save).
            active = self.peft_model.active_adapter
            self.peft_model.save_pretrained(str(staging), state_dict=state_dict, safe_serialization=True,
                                            save_embedding_layers=False, selected_adapters=[active])
            if active != "default":  # peft writes any other adapter name into a sub-folder of that name
                for path in list((staging / active).iterdir()):
                    os.replace(path, staging / path.name)
                (staging / active).rmdir()
            (staging / QADAPTER_CONFIG_NAME).write_text(self.qadapter_config.to_json())
            files = sorted(staging.iterdir(), key=lambda p: p.name == QADAPTER_CONFIG_NAME)  # our config last
            for path in files:
                with open(path, "rb") as f:
                    os.fsync(f.fileno())  # on disk before it becomes visible under the final name
            if not directory.exists():
                os.replace(staging, directory)
                return
            for path in files:
                os.replace(path, directory / path.name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def load_adapter_weights(self, directory: str | os.PathLike) -> None:
        """Loads the LoRA weights of a saved folder into this model (resume; safetensors only)."""
        weights = adapter_weights_file(Path(directory))
        active = self.peft_model.active_adapter
        check_adapter_state(self.peft_model, weights, active)
        peft.set_peft_model_state_dict(self.peft_model, safetensors.torch.load_file(str(weights)), adapter_name=active)
        check_finite_lora(self.peft_model, weights, active)

    def load_adapter(self, directory: str | os.PathLike, name: str) -> None:
        """Loads another saved Q-Adapter, frozen, as adapter ``name``, for composing at decode
        (``generate(adapters={...})``). It must have been trained on the same base model (the path
        recorded in its ``qadapter_config.json``) with the same alpha_tilde and alpha_0 as this
        model: the composed policy has one of each. Safetensors only.
        """
        if not isinstance(name, str) or not name or "." in name or name == "__base__":
            raise ValueError(f"name must be a non-empty adapter name without '.' (not '__base__'), got {name!r}")
        if name in self.adapter_configs:
            raise ValueError(f"an adapter named {name!r} is already loaded")
        directory = Path(directory)
        config, weights = _read_saved_adapter(directory)
        self._check_composable(directory, config)
        try:
            self.peft_model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
        except (RuntimeError, KeyError, TypeError, ValueError) as e:  # peft: a size or type mismatch
            raise ValueError(f"{directory} does not fit the base model: {str(e).strip().splitlines()[0]}") from None
        self.adapter_configs[name] = config
        try:
            check_adapter_state(self.peft_model, weights, name)
            check_finite_lora(self.peft_model, weights, name)
        except ValueError:
            self.peft_model.delete_adapter(name)
            del self.adapter_configs[name]
            raise

    def _check_composable(self, directory: Path, config: QAdapterConfig) -> None:
        base, own = config.base_model, self.qadapter_config.base_model
        if base is None or own is None or os.path.realpath(os.path.expanduser(base)) != os.path.realpath(
                os.path.expanduser(own)):
            raise ValueError(f"{directory} was trained on base model {base!r}, this model's base is {own!r}: "
                             "adapters compose only on the base model they were trained on")
        for field in ("alpha_tilde", "alpha_0"):
            if getattr(config, field) != getattr(self.qadapter_config, field):
                raise ValueError(f"{directory} has {field}={getattr(config, field)}, this model "
                                 f"{getattr(self.qadapter_config, field)}: the composed policy has one {field}")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike | Mapping[str, str | os.PathLike],
                        base_model: str | os.PathLike | PreTrainedModel | None = None) -> "QAdapterModel":
        """Loads a folder written by ``save_pretrained``; the adapter is trainable.

        ``base_model``: a path, or a loaded causal LM (modified in place); None loads the path
        recorded at save time. Nothing is unpickled: adapter weights must be safetensors.
        ``directory`` may also be ``{name: folder, ...}`` (adapters to compose at decode): the first
        is loaded as above under its name, the others with ``load_adapter`` (same base, same alphas).
        """
        if isinstance(directory, Mapping):
            if not directory:
                raise ValueError("directory must be a folder or a non-empty {name: folder} dict")
            (name, first), *others = directory.items()
            model = cls._load(Path(first), base_model, name)
            for other_name, other in others:
                model.load_adapter(other, other_name)
            return model
        return cls._load(Path(directory), base_model, "default")

    @classmethod
    def _load(cls, directory: Path, base_model, adapter_name: str) -> "QAdapterModel":
        config, weights = _read_saved_adapter(directory)
        if base_model is None:
            if config.base_model is None:
                raise ValueError(f"{directory / QADAPTER_CONFIG_NAME} records no base model: pass base_model=")
            base_model = config.base_model
        if isinstance(base_model, (str, os.PathLike)):
            config = dataclasses.replace(config, base_model=str(base_model))
            base_model = load_base_model(base_model)
        try:
            with warnings.catch_warnings():
                # peft only warns about missing adapter keys; check_adapter_state below makes them an error
                # naming them, so its warning would be the same news twice.
                warnings.filterwarnings("ignore", message=".*Found missing adapter keys", category=UserWarning)
                peft_model = peft.PeftModel.from_pretrained(base_model, str(directory), adapter_name=adapter_name,
                                                            is_trainable=True)
        except (RuntimeError, KeyError, TypeError) as e:  # peft: a size mismatch, a malformed adapter_config.json
            raise ValueError(f"{directory} does not fit the base model: {str(e).strip().splitlines()[0]}") from None
        check_adapter_state(peft_model, weights, adapter_name)  # peft only warns about missing or unexpected keys
        check_finite_lora(peft_model, weights, adapter_name)
        return cls(peft_model, config)


def _read_saved_adapter(directory: Path) -> tuple[QAdapterConfig, Path]:
    """The config and the weights file of a ``save_pretrained`` folder, checked before any model loads."""
    config_file = directory / QADAPTER_CONFIG_NAME
    if not config_file.is_file():
        raise FileNotFoundError(f"{config_file} not found: not a folder written by QAdapterModel.save_pretrained")
    config = QAdapterConfig.from_json(config_file.read_text())
    weights = adapter_weights_file(directory)
    saved_tensor_shapes(weights)  # a truncated or foreign file fails here, before the base model loads
    return config, weights
