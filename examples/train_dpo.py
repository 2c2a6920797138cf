"""LoRA preference tuning, as TRL's DPO (train_dpo.py) or as a Q-Adapter (train_qadapter.py): the two
scripts differ only in the trainer and its config class.

    python3 examples/train_dpo.py MODEL DATA.jsonl OUTPUT_DIR [MAX_STEPS]
    python3 examples/train_qadapter.py MODEL DATA.jsonl OUTPUT_DIR [MAX_STEPS]

MODEL: a local model folder or a model name in the Hugging Face cache; DATA: preference rows
(prompt, chosen, rejected), strings or conversations.
"""
import sys

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoTokenizer
from trl import DPOConfig, DPOTrainer

model, data, output_dir = sys.argv[1:4]
max_steps = int(sys.argv[4]) if len(sys.argv) > 4 else -1

tokenizer = AutoTokenizer.from_pretrained(model)
if tokenizer.pad_token is None:
    tokenizer.pad_token = tokenizer.eos_token
train_dataset = load_dataset("json", data_files=data, split="train")

args = DPOConfig(
    output_dir=output_dir, max_steps=max_steps, per_device_train_batch_size=2, max_length=256, save_strategy="no",
    use_cpu=not torch.cuda.is_available(),
)
trainer = DPOTrainer(
    model=model, args=args, train_dataset=train_dataset, processing_class=tokenizer,
    peft_config=LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "v_proj"]),
)
trainer.train()
trainer.save_model(output_dir)
