"""Third-party messages that a user of the ``qadapter`` command cannot act on, dropped at their source.

Each filter drops one message, named here with the reason; everything else those libraries say is
shown as usual. ``cli.main`` installs them before the libraries are imported: a logger's filters
outlive the library's own logging set-up, and a warnings filter applies from then on.
"""
from __future__ import annotations

import logging
import warnings

__all__ = ["drop_third_party_noise"]


def _drop_log_message(logger_name: str, message_start: str) -> None:
    logging.getLogger(logger_name).addFilter(lambda record: not record.getMessage().startswith(message_start))


def drop_third_party_noise() -> None:
    """Installs the filters."""
    # bitsandbytes, installed for 4-bit bases and imported by peft whenever present, warns at import that
    # its optional `kernels` package is missing; that package only speeds up bitsandbytes' own CPU 4-bit
    # matmul, which nothing here uses unless the user loads a 4-bit base.
    _drop_log_message("bitsandbytes.backends.cpu.ops", "Failed to load CPU gemm_4bit_forward")
    # DeepSpeed, installed for ZeRO training and imported by accelerate whenever present, reports on
    # import (on stdout) that it found no GPU; a run that uses DeepSpeed still gets its own messages.
    _drop_log_message("DeepSpeed", "Setting accelerator to CPU")
    # peft 0.21 reads PreTrainedModel.is_gradient_checkpointing, which transformers 5 deprecates: a note
    # for peft's authors, printed once per adapter a command creates or loads.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                            category=FutureWarning)
