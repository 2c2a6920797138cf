"""Q-Adapter model: a transformers causal LM, a peft LoRA adapter, and the fused loss.

Q_R is the LM-head output of the model with the adapter on, pi_1 the same model with it off
(DESIGN.md §1). Both passes stop at the decoder's final hidden states; the shared, frozen LM
head is applied inside ``fused_linear_qadapter_loss``, so no [N, V] logits tensor is built.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import peft
import safetensors.torch
import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from ..api import fused_linear_qadapter_loss
from ..decoding.logit_identity import NEUTRAL_VALUES, POST_HEAD_LOGIT_FIELDS
from ..outputs import QAdapterLossOutput
from ..params import RewardVariant, check_scalar

QADAPTER_CONFIG_NAME = "qadapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
_PICKLED_ADAPTER_NAME = "adapter_model.bin"


@dataclass
class QAdapterConfig:
    """Q-Adapter and LoRA hyper-parameters (defaults: the authors', DESIGN.md §1).

    ``base_model`` is the path the base model was loaded from (a folder, or a ``.gguf`` file),
    recorded so that a saved adapter can be loaded back without naming it again.
    ``tile_budget_mb`` is passed to ``fused_linear_qadapter_loss`` (None: its default).
    """

    alpha_tilde: float = 1.0
    alpha_0: float = 0.01
    gamma: float = 1.0
    beta: float = 0.1
    variant: str = "bellman"
    length_norm: bool = True
    lora_r: int = 8
    lora_alpha: float = 16
    lora_dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    base_model: str | None = None
    tile_budget_mb: float | None = None

    def validate(self) -> "QAdapterConfig":
        """Raises ValueError (TypeError for a wrong type) naming the first bad field; returns self."""
        check_scalar("alpha_tilde", self.alpha_tilde, 0.0, float("inf"), low_open=True)
        check_scalar("alpha_0", self.alpha_0, 0.0, float("inf"))
        check_scalar("gamma", self.gamma, 0.0, 1.0)
        check_scalar("beta", self.beta, 0.0, float("inf"))
        check_scalar("lora_alpha", self.lora_alpha, 0.0, float("inf"), low_open=True)
        if check_scalar("lora_dropout", self.lora_dropout, 0.0, 1.0) == 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        RewardVariant.parse(self.variant)
        if not isinstance(self.length_norm, bool):
            raise TypeError(f"length_norm must be a bool, got {type(self.length_norm).__name__}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 1:
            raise ValueError(f"lora_r must be an integer >= 1, got {self.lora_r!r}")
        if (isinstance(self.target_modules, str) or not self.target_modules
                or not all(isinstance(m, str) and m for m in self.target_modules)):
            raise ValueError(f"target_modules must be a non-empty sequence of names, got {self.target_modules!r}")
        if self.base_model is not None and not isinstance(self.base_model, str):
            raise TypeError(f"base_model must be a path string or None, got {type(self.base_model).__name__}")
        if self.tile_budget_mb is not None:
            check_scalar("tile_budget_mb", self.tile_budget_mb, 0.0, float("inf"), low_open=True)
        return self

    def loss_kwargs(self) -> dict:
        """The keyword arguments of ``fused_linear_qadapter_loss`` / ``qadapter_loss`` this config sets."""
        return dict(alpha_tilde=self.alpha_tilde, alpha_0=self.alpha_0, gamma=self.gamma, beta=self.beta,
                    variant=self.variant, length_norm=self.length_norm)

    def lora_config(self) -> peft.LoraConfig:
        return peft.LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                               target_modules=list(self.target_modules), task_type="CAUSAL_LM")

    def to_json(self) -> str:
        return json.dumps({**dataclasses.asdict(self), "target_modules": list(self.target_modules)}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> "QAdapterConfig":
        """Parses and validates ``to_json`` output; unknown fields are an error (a typo would be ignored)."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("a Q-Adapter config must be a JSON object")
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise ValueError(f"unknown Q-Adapter config fields: {unknown}")
        if "target_modules" in data and isinstance(data["target_modules"], list):
            data["target_modules"] = tuple(data["target_modules"])
        return cls(**data).validate()


def load_base_model(path: str | os.PathLike) -> PreTrainedModel:
    """A causal LM from a folder (safetensors weights only) or a GGUF file.

    A folder without ``config.json`` holding exactly one ``.gguf`` file loads that file: a
    GGUF-loaded model records only its folder as ``name_or_path``.
    """
    path = Path(path)
    gguf = [path] if path.suffix == ".gguf" else []
    if not gguf and path.is_dir() and not (path / "config.json").exists():
        gguf = sorted(path.glob("*.gguf"))
        if len(gguf) > 1:
            raise ValueError(f"{path} holds several .gguf files; pass the one to load as base_model")
    if gguf:
        return AutoModelForCausalLM.from_pretrained(str(gguf[0].parent), gguf_file=gguf[0].name)
    return AutoModelForCausalLM.from_pretrained(str(path), use_safetensors=True)


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
    config = getattr(causal_lm, "config", None)
    # The fused loss applies the LM head alone, so such models would silently get a different Q.
    for field in POST_HEAD_LOGIT_FIELDS:
        value = getattr(config, field, None)
        if value not in NEUTRAL_VALUES:
            raise NotImplementedError(
                f"{type(causal_lm).__name__} transforms its logits after the LM head ({field}={value}); "
                "the fused loss applies the LM head alone"
            )
    return decoder


class QAdapterModel(torch.nn.Module):
    """A causal LM with a LoRA adapter trained as the Q-Adapter residual Q-function.

    Only the LoRA parameters are trainable; the LM head is shared by both passes and frozen.
    ``causal_lm`` is modified in place (peft injects the LoRA layers into it). It may also be a
    ``peft.PeftModel`` that already holds the adapter (``from_pretrained`` passes one); its LoRA
    settings then win over the ``lora_*`` fields of ``config``.
    """

    def __init__(self, causal_lm: PreTrainedModel | peft.PeftModel, config: QAdapterConfig | None = None):
        super().__init__()
        config = dataclasses.replace(config or QAdapterConfig()).validate()
        base = causal_lm.get_base_model() if isinstance(causal_lm, peft.PeftModel) else causal_lm
        self._decoder_path = self._module_path(base, _find_decoder(base))
        if config.base_model is None and getattr(base, "name_or_path", ""):
            config.base_model = str(base.name_or_path)
        self.qadapter_config = config
        if isinstance(causal_lm, peft.PeftModel):
            self.peft_model = causal_lm
        else:
            self.peft_model = peft.get_peft_model(causal_lm, config.lora_config())
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
    def decoder(self) -> torch.nn.Module:
        return self.base_causal_lm.get_submodule(self._decoder_path)

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.base_causal_lm.get_output_embeddings()

    def final_hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The decoder's last hidden states [2B, T, H] with the adapter as it is now set."""
        out = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out[0]  # last_hidden_state, whether the decoder returns a ModelOutput or a tuple

    def compute_loss(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                     loss_mask: torch.Tensor) -> QAdapterLossOutput:
        """The Q-Adapter loss of a batch of 2B rows (B chosen, then B rejected; DESIGN.md §2)."""
        adapter_hidden = self.final_hidden_states(input_ids, attention_mask)
        with torch.no_grad(), self.peft_model.disable_adapter():
            base_hidden = self.final_hidden_states(input_ids, attention_mask)
        head = self.lm_head
        weight, bias = head.weight, getattr(head, "bias", None)
        # Under autocast the hidden states may come out in another dtype than the head's weight.
        return fused_linear_qadapter_loss(
            adapter_hidden.to(weight.dtype), base_hidden.to(weight.dtype), weight, input_ids, loss_mask,
            lm_head_bias=bias, tile_budget_mb=self.qadapter_config.tile_budget_mb,
            **self.qadapter_config.loss_kwargs(),
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                loss_mask: torch.Tensor) -> QAdapterLossOutput:
        """Same as ``compute_loss``; the explicit signature also tells ``transformers.Trainer``
        which batch columns to keep (``loss_mask`` included)."""
        return self.compute_loss(input_ids, attention_mask, loss_mask)

    # ------------------------------------------------------------------ decoding

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int = 64, temperature: float | torch.Tensor = 1.0, top_k: int | torch.Tensor = 0,
                 top_p: float | torch.Tensor = 1.0, min_p: float | torch.Tensor = 0.0,
                 generator: torch.Generator | int | None = None, eos_token_id: int | list[int] | None = None,
                 pad_token_id: int | None = None, stop_strings: str | list[str] | None = None, tokenizer=None,
                 two_pass: bool = False, adapter: bool = True, streamer=None) -> torch.Tensor:
        """Samples from the customised policy ``(Q + alpha_0 * log_softmax(L)) / alpha_tilde``.

        Returns ``[B, T + n]`` token ids like transformers' ``generate``: the prompt (with its
        padding) then the n <= ``max_new_tokens`` new tokens; a row that ended (EOS or a stop
        string) is filled with ``pad_token_id`` while the others go on. Each token costs ONE
        forward over a mixed batch of 2B rows (adapter rows and peft ``"__base__"`` rows, one KV
        cache), then ``combined_sample_from_hidden`` on the last hidden states, so neither logits
        row is ever stored.

        Args:
            input_ids, attention_mask: ``[B, T]`` prompts, left-padded (mask 0 on the padding).
            temperature, top_k, top_p, min_p: as ``qk.combined_sample`` (applied in Hugging Face's
                order; temperature 0 is greedy); Python scalars or per-row ``[B]`` tensors.
            generator: a ``torch.Generator`` or an int seed: the same seed gives the same tokens.
            eos_token_id, pad_token_id: default to the model's generation config (else its config,
                else ``tokenizer``'s); a row stops after any EOS id.
            stop_strings: a row also stops once its generated text contains one of these (needs
                ``tokenizer``); the tokens that completed it are kept, as in transformers.
            two_pass: the authors' scheme instead (a forward with the adapter and one without per
                token, two KV caches); same distribution, for comparison.
            adapter: False samples from the base model alone (adapter off), for side-by-side comparisons.
            streamer: an object with ``put(ids)`` and ``end()`` (e.g. ``transformers.TextStreamer``)
                that receives the prompt, then each step's new tokens ``[B]``.
        """
        from ..decoding import generate

        return generate(self, input_ids, attention_mask, max_new_tokens=max_new_tokens, temperature=temperature,
                        top_k=top_k, top_p=top_p, min_p=min_p, generator=generator, eos_token_id=eos_token_id,
                        pad_token_id=pad_token_id, stop_strings=stop_strings, tokenizer=tokenizer,
                        two_pass=two_pass, adapter=adapter, streamer=streamer)

    def generate_text(self, tokenizer, prompts: str | list, **kwargs) -> str | list[str]:
        """``generate`` with strings: prompt(s) in, the new text(s) out.

        ``prompts``: a string, a conversation (list of ``{"role", "content"}``), or a list of those.
        Each is encoded as training encodes prompts (``training.data.encode_prompt``: the chat
        template with the generation prompt when the tokenizer has one), left-padded into one batch.
        The new tokens are decoded without special tokens and cut before the first stop string.
        ``kwargs``: those of ``generate``.
        """
        from ..decoding import generate_text

        return generate_text(self, tokenizer, prompts, **kwargs)

    def activation_checkpointing_enable(self, **kwargs) -> None:
        """Called by ``transformers.Trainer`` for ``gradient_checkpointing=True``."""
        self.base_causal_lm.activation_checkpointing_enable(**kwargs)

    # ------------------------------------------------------------------ saving and loading

    def save_pretrained(self, directory: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """Writes a peft adapter folder (safetensors) plus ``qadapter_config.json``, atomically.

        Everything is written to a temporary folder beside ``directory`` first; then the files
        are moved in with ``os.replace``, so an interrupted save leaves any earlier save whole.
        Files already in ``directory`` that are not ours (a Trainer checkpoint's optimizer state)
        are kept. ``state_dict``: a full state dict of this module to save from instead of the
        live parameters (what ``Trainer`` passes under FSDP / DeepSpeed).
        """
        directory = Path(directory)
        directory.parent.mkdir(parents=True, exist_ok=True)
        if state_dict is not None:
            prefix = "peft_model."
            state_dict = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        # Not tempfile.mkdtemp: its 0700 mode would stick to a folder renamed into place.
        staging = directory.parent / f".{directory.name}.saving-{uuid.uuid4().hex[:12]}"
        staging.mkdir()
        try:
            self.peft_model.save_pretrained(str(staging), state_dict=state_dict, safe_serialization=True)
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
        weights = _safetensors_adapter_file(Path(directory))
        result = peft.set_peft_model_state_dict(self.peft_model, safetensors.torch.load_file(str(weights)))
        missing = [k for k in result.missing_keys if "lora_" in k]  # the base weights are always "missing"
        if result.unexpected_keys or missing:
            raise ValueError(f"{weights} does not match this adapter: unexpected {result.unexpected_keys[:3]}, "
                             f"missing {missing[:3]}")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike,
                        base_model: str | os.PathLike | PreTrainedModel | None = None) -> "QAdapterModel":
        """Loads a folder written by ``save_pretrained``; the adapter is trainable.

        ``base_model``: a path, or a loaded causal LM (modified in place); None loads the path
        recorded at save time. Nothing is unpickled: adapter weights must be safetensors.
        """
        directory = Path(directory)
        config_file = directory / QADAPTER_CONFIG_NAME
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file} not found: not a folder written by QAdapterModel.save_pretrained")
        config = QAdapterConfig.from_json(config_file.read_text())
        _safetensors_adapter_file(directory)
        if base_model is None:
            if config.base_model is None:
                raise ValueError(f"{config_file} records no base model: pass base_model=")
            base_model = config.base_model
        if isinstance(base_model, (str, os.PathLike)):
            config.base_model = str(base_model)
            base_model = load_base_model(base_model)
        peft_model = peft.PeftModel.from_pretrained(base_model, str(directory), is_trainable=True)
        return cls(peft_model, config)


def _safetensors_adapter_file(directory: Path) -> Path:
    weights = directory / ADAPTER_WEIGHTS_NAME
    if weights.is_file():
        return weights
    if (directory / _PICKLED_ADAPTER_NAME).exists():
        raise ValueError(
            f"{directory} holds {_PICKLED_ADAPTER_NAME} (pickle), which is never loaded: convert it to "
            f"{ADAPTER_WEIGHTS_NAME} with a tool you trust"
        )
    raise FileNotFoundError(f"{weights} not found")
