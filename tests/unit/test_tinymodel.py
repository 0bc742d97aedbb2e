"""`climbrl tiny-model OUT --env NAME`: the tokenizer is trained on the env's own text, so the
env's prompts stay short; an env without a tokenizer_corpus() gives its prompts instead."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from climbrl.cli import main as cli_main
from climbrl.envs.tinymodel import env_corpus

WORDS = ["invoice", "shipment", "warehouse", "customer", "quarterly", "overdue", "refund"]
ENV = f'''
from climbrl.envs.base import Env, StepResult, Task

WORDS = {WORDS!r}


class Ledger(Env):
    """Chat prompts of long English words; no tokenizer_corpus()."""

    def num_tasks(self, split):
        return 40

    def get_task(self, split, index):
        words = " ".join(WORDS[(index + k) % len(WORDS)] for k in range(6))
        return Task(task_id=f"{{split}}/{{index}}", split=split, answer="yes",
                    prompt=[{{"role": "user", "content": "Is this overdue? " + words}}])

    async def reset(self, task):
        return task.prompt

    async def step(self, completion):
        return StepResult(reward=float(completion.strip() == "yes"), done=True)

    def reference_turns(self, task):
        return ["yes"]
'''


@pytest.fixture
def ledger(tmp_path: Path) -> str:
    (tmp_path / "ledger_env.py").write_text(ENV)
    return f"{tmp_path / 'ledger_env.py'}:Ledger"


def _longest(out: str) -> dict[str, int]:
    m = re.search(r"longest prompt in tokens train (\d+), test (\d+)", out)
    assert m, out
    return {"train": int(m[1]), "test": int(m[2])}


def test_an_env_without_a_corpus_gives_its_prompts_and_reference_turns(ledger: str) -> None:
    from climbrl.envs.base import make_env

    corpus = env_corpus(make_env(ledger))
    assert len(corpus) == 80  # 40 tasks in each of train and test
    assert corpus[0].startswith("<|im_start|>user\nIs this overdue? invoice shipment")
    assert corpus[0].endswith("<|im_start|>assistant\nyes<|im_end|>\n")


def test_tiny_model_with_env_fits_the_envs_prompts(ledger: str, tmp_path: Path, capsys) -> None:
    assert cli_main(["tiny-model", str(tmp_path / "plain")]) == 0
    assert cli_main(["tiny-model", str(tmp_path / "fit"), "--env", ledger]) == 0
    longest = _longest(capsys.readouterr().out)
    plain = AutoTokenizer.from_pretrained(tmp_path / "plain")
    prompt = plain.apply_chat_template(
        [{"role": "user", "content": "Is this overdue? " + " ".join(WORDS[:6])}],
        tokenize=False,
        add_generation_prompt=True,
    )
    assert longest["train"] < len(plain.encode(prompt, add_special_tokens=False)) / 2
    fit = AutoTokenizer.from_pretrained(tmp_path / "fit")
    assert (
        fit.chat_template
        and json.loads((tmp_path / "fit" / "climbrl_model.json").read_text())["params"] > 0
    )


def test_tiny_model_env_errors_are_clear(tmp_path: Path, capsys) -> None:
    assert cli_main(["tiny-model", str(tmp_path / "m"), "--env", "no_such_env"]) == 2
    assert "unknown env 'no_such_env'" in capsys.readouterr().err
    assert (
        cli_main(["tiny-model", str(tmp_path / "m"), "--env", "copy_first", "--env-args", "[1]"])
        == 2
    )
    assert "--env-args must be a JSON object" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()
