"""SFT with the loss on assistant tokens only, through TRL's SFTTrainer.

TRL serves here: its ``assistant_only_loss`` masks everything but the assistant turns, using a
chat template whose assistant content sits inside ``{% generation %}`` blocks. The ChatML
template of `climbrl.tokenizer` is swapped for the same template with those markers
while training; the saved model keeps the plain template (what vLLM serves).

Data: a jsonl file, one ``{"messages": [{"role": ..., "content": ...}, ...]}`` per line.

    climbrl pretrain examples/pretrain_sft.toml
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from climbrl.pretrain.config import PretrainConfig

# ChatML with the assistant content (and its end marker) marked for TRL's assistant mask.
CHAT_TEMPLATE_MARKED = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def load_conversations(path: str) -> list[dict[str, Any]]:
    rows = []
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"SFT data file {p} does not exist")
    for i, line in enumerate(p.read_text().splitlines()):
        if not line.strip():
            continue
        obj = json.loads(line)
        msgs = obj.get("messages")
        if not isinstance(msgs, list) or not any(m.get("role") == "assistant" for m in msgs):
            raise ValueError(
                f"{p}:{i + 1}: needs a 'messages' list with at least one assistant turn"
            )
        rows.append({"messages": msgs})
    if not rows:
        raise ValueError(f"{p} holds no conversations")
    return rows


def run_sft(cfg: PretrainConfig) -> dict[str, Any]:
    """Fine-tune `cfg.init.from_dir` on `cfg.sft.data`; the result goes to ``run_dir/model``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
    from trl import SFTConfig, SFTTrainer  # pyright: ignore[reportPrivateImportUsage]  # lazy exports

    assert cfg.sft is not None and cfg.init.from_dir is not None
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    tok = AutoTokenizer.from_pretrained(cfg.init.from_dir)
    plain_template = tok.chat_template
    tok.chat_template = CHAT_TEMPLATE_MARKED
    model = AutoModelForCausalLM.from_pretrained(cfg.init.from_dir, dtype=torch.float32)
    ds = Dataset.from_list(load_conversations(cfg.sft.data))
    args = SFTConfig(
        output_dir=str(run_dir / "trl"),
        assistant_only_loss=True,
        max_length=cfg.sft.max_length,
        num_train_epochs=cfg.sft.epochs,
        max_steps=cfg.sft.max_steps,
        learning_rate=cfg.sft.lr,
        per_device_train_batch_size=cfg.sft.batch_size,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=cfg.train.weight_decay,
        max_grad_norm=cfg.train.grad_clip or 1e9,
        logging_steps=cfg.train.log_every,
        save_strategy="no",
        report_to=[],
        seed=cfg.train.seed,
        bf16=cfg.train.dtype == "bf16",
        use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    result = trainer.train()
    tok.chat_template = plain_template
    out = run_dir / "model"
    assert isinstance(trainer.model, PreTrainedModel)  # no PEFT wrapper here
    trainer.model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    summary = {
        "train_loss": result.training_loss,
        "steps": result.global_step,
        "model_dir": str(out),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
