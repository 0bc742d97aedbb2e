"""Data pipeline stages on small inputs: reading, dedup, quality, decontamination, mixing, packing.

pytest tests/unit/test_pretrain_data.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from climbrl.pretrain.config import DataConfig, FileSource
from climbrl.pretrain.data import (
    Decontaminator,
    Doc,
    ExactDedup,
    Funnel,
    FuzzyDedup,
    QualityFilter,
    StageStats,
    dup_ngram_fraction,
    filter_stage,
    labels_for,
    mix,
    pack_docs,
    read_texts,
    run_pipeline,
    symbol_ratio,
)

WORDS = [f"w{i}" for i in range(3000)]


def random_doc(rng: random.Random, n_words: int = 200) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


def mutate(text: str, rng: random.Random, n_changes: int) -> str:
    words = text.split()
    for i in rng.sample(range(len(words)), n_changes):
        words[i] = "changed" + str(rng.randrange(10**6))
    return " ".join(words)


class FakeTok:
    """Whitespace 'tokenizer': one id per word. The pipeline only needs ids and eos/pad."""

    eos_token_id = 0
    pad_token_id = 1

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": [2 + (hash(w) % 1000) for w in text.split()]}


def test_read_txt_jsonl_parquet(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text("doc one\nline two\n\n\ndoc two\n")
    (tmp_path / "b.jsonl").write_text(
        json.dumps({"text": "j1"}) + "\n\n" + json.dumps({"text": "j2"}) + "\n"
    )
    pq.write_table(pa.table({"content": ["p1", None, "p2"]}), tmp_path / "c.parquet")
    assert list(read_texts(tmp_path / "a.txt")) == ["doc one\nline two", "doc two"]
    assert list(read_texts(tmp_path / "b.jsonl")) == ["j1", "j2"]
    assert list(read_texts(tmp_path / "c.parquet", "content")) == ["p1", "p2"]
    with pytest.raises(ValueError, match="no column"):
        list(read_texts(tmp_path / "c.parquet", "text"))
    (tmp_path / "d.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported"):
        list(read_texts(tmp_path / "d.csv"))


def test_exact_dedup_normalises_whitespace_and_case() -> None:
    ded = ExactDedup()
    kept = [
        t for t in ["Hello  world", "hello world\n", "hello there", "HELLO WORLD"] if ded(Doc(t))
    ]
    assert kept == ["Hello  world", "hello there"]


def test_fuzzy_dedup_removes_planted_near_duplicates_and_nothing_else() -> None:
    rng = random.Random(0)
    originals = [random_doc(rng) for _ in range(60)]
    docs: list[tuple[str, bool]] = [(t, False) for t in originals]  # (text, is_planted_duplicate)
    for t in originals[:15]:
        docs.append((mutate(t, rng, 2), True))  # Jaccard of 5-gram shingles ~0.9
    for t in originals[15:30]:
        docs.append((mutate(t, rng, 40), False))  # heavily edited: Jaccard ~0.15, must be kept
    rng.shuffle(docs)
    # Originals must come before their near-copies for "first one wins" to be well defined.
    docs.sort(key=lambda d: d[1])
    fuzzy = FuzzyDedup(threshold=0.8, num_perm=128, shingle_words=5)
    dropped = [planted for text, planted in docs if not fuzzy(Doc(text))]
    assert len(dropped) == 15 and all(dropped)


def test_quality_filters() -> None:
    cfg = DataConfig(min_chars=10, max_chars=200, max_symbol_ratio=0.3, max_dup_ngram_frac=0.3)
    q = QualityFilter(cfg)
    good = "the quick brown fox jumps over the lazy dog"
    assert q(Doc(good))
    assert not q(Doc("short"))
    assert not q(Doc("x" * 300))
    assert not q(Doc("$$$ %%% ^^^ &&& *** ((( )))"))
    assert not q(Doc("buy now " * 20))
    assert q.reasons == {"length": 2, "symbols": 1, "repetition": 1}
    assert symbol_ratio("ab!!") == 0.5
    assert dup_ngram_fraction("a b c a b c") == pytest.approx(1 - 3 / 4)


def test_decontamination_drops_only_overlapping_docs() -> None:
    evals = ["what is the capital of france answer paris today", "12+7="]
    dec = Decontaminator(evals, n=8)
    assert not dec(Doc("quiz: What is the capital of France? Answer: Paris today, they say"))
    assert not dec(Doc("we saw 12 + 7 = 19 here"))  # short eval item matched as a whole
    assert dec(Doc("the capital of france is paris"))  # shares only 6 words
    assert dec(Doc("12+8=20"))


def test_mix_follows_token_weights() -> None:
    def stream(name: str, n: int, size: int) -> list[Doc]:
        return [Doc(f"{name}{i}", name, ids=[2] * size) for i in range(n)]

    stats = StageStats("mix")
    out = list(
        mix(
            {"a": iter(stream("a", 1000, 10)), "b": iter(stream("b", 1000, 5))},
            {"a": 3.0, "b": 1.0},
            stats,
        )
    )
    tok_a = sum(d.n_tokens for d in out if d.domain == "a")
    tok_b = sum(d.n_tokens for d in out if d.domain == "b")
    assert tok_a / (tok_a + tok_b) == pytest.approx(0.75, abs=0.01)
    # 'stop': the mix ends when domain a (the one due) runs dry.
    assert sum(1 for d in out if d.domain == "a") == 1000
    assert stats.docs_out == len(out)


def test_packing_positions_and_labels() -> None:
    p = pack_docs([[5, 6, 7], [8, 9], [10, 11, 12, 13, 14, 15]], seq_len=6, eos_id=0, pad_id=1)
    assert p.tokens.tolist() == [[5, 6, 7, 0, 8, 9], [0, 10, 11, 12, 13, 14], [15, 0, 1, 1, 1, 1]]
    assert p.positions.tolist() == [[0, 1, 2, 3, 0, 1], [0, 0, 1, 2, 3, 4], [0, 1, 0, 1, 2, 3]]
    lab = labels_for(p.tokens, p.positions, pad_id=1)
    # EOS targets kept; cross-document targets, padding and the row end masked.
    assert lab[0].tolist() == [6, 7, 0, -100, 9, -100]
    assert lab[2].tolist() == [0, -100, -100, -100, -100, -100]


def test_filter_stage_counts() -> None:
    s = StageStats("f")
    docs = [Doc("a", ids=[1, 2]), Doc("b", ids=[3]), Doc("c", ids=[4, 5, 6])]
    kept = list(filter_stage(docs, lambda d: d.text != "b", s))
    assert [d.text for d in kept] == ["a", "c"]
    assert (s.docs_in, s.docs_out, s.tokens_in, s.tokens_out) == (3, 2, 6, 5)


def test_pipeline_end_to_end_funnel(tmp_path: Path) -> None:
    rng = random.Random(1)
    base = [random_doc(rng, 120) for _ in range(40)]
    web = base + [
        base[0],
        base[1].upper(),
        mutate(base[2], rng, 1),
        "$$$ ### @@@ !!! ???",
        "spam " * 30,
    ]
    (tmp_path / "web.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in web))
    code = [random_doc(rng, 30) for _ in range(40)]
    (tmp_path / "code.txt").write_text("\n\n".join(code))
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": base[5]}) + "\n")
    cfg = DataConfig(
        source="files",
        files=[
            FileSource(paths=[str(tmp_path / "web.jsonl")], domain="web", weight=1.0),
            FileSource(paths=[str(tmp_path / "code.txt")], domain="code", weight=1.0),
        ],
        decontam_files=[str(tmp_path / "eval.jsonl")],
        seq_len=32,
        eval_fraction=0.1,
        mix_on_exhaust="continue",
    )
    funnel = run_pipeline(cfg, FakeTok(), tmp_path / "out", quiet=True)
    by = {s.name.split(" (")[0]: s for s in funnel.stages}
    assert by["read+tokenize"].docs_out == 85
    assert by["exact dedup"].docs_in - by["exact dedup"].docs_out == 2
    assert by["fuzzy dedup"].docs_in - by["fuzzy dedup"].docs_out == 1
    assert by["quality filters"].extra["dropped_by"] == {"length": 0, "symbols": 1, "repetition": 1}
    assert by["decontamination"].docs_in - by["decontamination"].docs_out == 1
    assert by["domain mix"].docs_out == 79
    for s in funnel.stages[:-1]:
        assert s.docs_out <= s.docs_in and s.tokens_out <= s.tokens_in
    saved = json.loads((tmp_path / "out" / "funnel.json").read_text())
    assert [s["name"] for s in saved] == [s.name for s in funnel.stages]
    tokens = np.load(tmp_path / "out" / "train_tokens.npy")
    ev = np.load(tmp_path / "out" / "eval_tokens.npy")
    # Every kept word is in the packed output, plus one EOS per document.
    words = by["domain mix"].tokens_out
    assert int((tokens != 1).sum() + (ev != 1).sum()) == words + 79
    assert isinstance(funnel, Funnel)
