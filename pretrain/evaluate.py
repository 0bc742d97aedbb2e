"""Evaluation for pretraining: held-out NLL on packed rows, and greedy task accuracy.

python -m climbrl.pretrain.evaluate MODEL_DIR [--task add] [--n 200]
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from climbrl.pretrain.data import Packed, labels_for
from climbrl.pretrain.synthetic import Task, get_task


def batch_tensors(
    tokens: np.ndarray, positions: np.ndarray, pad_id: int, device: str
) -> tuple[torch.Tensor, ...]:
    """(input_ids, position_ids, labels) tensors for packed rows."""
    labels = labels_for(tokens, positions, pad_id)
    return (
        torch.from_numpy(tokens.astype(np.int64)).to(device),
        torch.from_numpy(positions.astype(np.int64)).to(device),
        torch.from_numpy(labels).to(device),
    )


@torch.no_grad()
def heldout_nll(
    model: Any,
    data: Packed,
    pad_id: int,
    *,
    batch_size: int,
    max_batches: int,
    device: str,
    autocast: Any,
) -> float:
    """Mean next-token NLL (nats/token) over the first `max_batches` batches of `data`."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for b in range(max_batches):
        lo = b * batch_size
        if lo >= len(data.tokens):
            break
        ids, pos, labels = batch_tensors(
            data.tokens[lo : lo + batch_size], data.positions[lo : lo + batch_size], pad_id, device
        )
        with autocast:
            logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        total += float(
            F.cross_entropy(
                logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum"
            )
        )
        count += int((labels != -100).sum())
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def task_accuracy(
    model: Any,
    tokenizer: Any,
    task: Task,
    n: int,
    *,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 8,
) -> dict[str, Any]:
    """Greedy accuracy on `n` held-out examples of `task` (plain-text prompts, no chat template)."""
    was_training = model.training
    model.eval()
    examples = task.sample("heldout", n, seed=seed)
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    correct = 0.0
    samples: list[dict[str, str]] = []
    device = next(model.parameters()).device
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        enc = tokenizer(
            [e.prompt for e in chunk], return_tensors="pt", padding=True, add_special_tokens=False
        ).to(device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        texts = tokenizer.batch_decode(
            out[:, enc["input_ids"].shape[1] :], skip_special_tokens=False
        )
        for e, t in zip(chunk, texts, strict=True):
            correct += task.score(t, e.answer)
            if len(samples) < 5:
                samples.append({"prompt": e.prompt, "completion": t, "answer": e.answer})
    tokenizer.padding_side = old_side
    model.train(was_training)
    return {"accuracy": correct / max(len(examples), 1), "n": len(examples), "samples": samples}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description="Greedy held-out accuracy of a saved model on a synthetic task."
    )
    ap.add_argument("model_dir")
    ap.add_argument("--task", default="add")
    ap.add_argument("--n", type=int, default=200)
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(a.model_dir)
    mdl = AutoModelForCausalLM.from_pretrained(a.model_dir, dtype=torch.float32)
    print(task_accuracy(mdl, tok, get_task(a.task), a.n))
