"""SFT mode: the loss mask covers assistant tokens only, and a TRL SFT run from a pretrained
checkpoint produces a model dir transformers reloads, with the plain ChatML template.

    pytest tests/integration/test_pretrain_sft.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from climbrl.pretrain.config import ModelConfig, load_config
from climbrl.pretrain.sft import CHAT_TEMPLATE_MARKED, run_sft

pytestmark = pytest.mark.integration

CONVS = [
    [{"role": "user", "content": f"{a}+{b}="}, {"role": "assistant", "content": str(a + b)}]
    for a, b in [(1, 2), (12, 30), (7, 8), (40, 2), (99, 1), (5, 5), (3, 4), (10, 20)]
]


@pytest.fixture
def base_dir(tmp_path: Path) -> Path:
    from climbrl.pretrain import model as M
    from climbrl.tokenizer import CHAT_TEMPLATE, train_bpe_tokenizer

    texts = [m["content"] for c in CONVS for m in c] * 5
    tok = train_bpe_tokenizer(texts, vocab_size=300, split_digits=True)
    assert tok.chat_template == CHAT_TEMPLATE
    cfg = ModelConfig(
        hidden_size=32,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    m = M.build_model(
        cfg, vocab_size=len(tok), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=0
    )
    out = tmp_path / "base"
    M.export(m, tok, str(out))
    return out


def test_assistant_mask_covers_assistant_tokens_only(base_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    plain = tok.apply_chat_template(CONVS[1], tokenize=False)
    tok.chat_template = CHAT_TEMPLATE_MARKED
    assert tok.apply_chat_template(CONVS[1], tokenize=False) == plain  # same text, plus a mask
    enc = tok.apply_chat_template(CONVS[1], return_assistant_tokens_mask=True, return_dict=True)
    masked = [t for t, m in zip(enc["input_ids"], enc["assistant_masks"], strict=True) if m]
    assert tok.decode(masked) == "42<|im_end|>"


def test_sft_run(base_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVS))
    cfg = load_config(
        None,
        [
            "mode=sft",
            f"run_dir={tmp_path / 'run'}",
            f"init.from_dir={base_dir}",
            f"sft.data={data}",
            "sft.max_steps=3",
            "sft.batch_size=4",
            "sft.lr=1e-3",
            "train.log_every=1",
        ],
    )
    summary = run_sft(cfg)
    assert summary["steps"] == 3 and summary["train_loss"] > 0
    out = Path(summary["model_dir"])
    AutoModelForCausalLM.from_pretrained(out)
    assert "{% generation %}" not in (AutoTokenizer.from_pretrained(out).chat_template or "")
