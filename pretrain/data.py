"""Data pipeline: stream local files -> dedup -> quality -> decontaminate -> mix -> pack.

Stages are generators over `Doc`s, so text streams through without being held whole (only
the packed token rows are collected at the end). Each stage counts the documents and tokens
that went in and came out; the `Funnel` is printed with rich and saved as ``funnel.json``.

* read: ``.txt`` (documents separated by blank lines), ``.jsonl`` (one object per line),
  ``.parquet`` (streamed by record batch with pyarrow); globs allowed.
* exact dedup: blake2b of the whitespace-normalised, lower-cased text.
* fuzzy dedup: MinHash over word n-gram shingles + MinHash-LSH (datasketch); a candidate is
  dropped only if its estimated Jaccard with an earlier kept doc is >= the threshold.
* quality: length, share of symbol characters, share of repeated word 3-grams.
* decontamination: drop docs sharing any word n-gram with the eval set.
* mixing: interleave domains so each gets its weight's share of tokens.
* packing: concatenate docs (+EOS) into fixed rows; ``positions`` restart at 0 at every document
  start, which transformers turns into a document (block-diagonal causal) mask and which the
  loss uses to skip cross-document targets.

    python -m climbrl.pretrain.data OUT_DIR FILE [FILE ...] [--tokenizer DIR] [--seq-len 256]
"""

from __future__ import annotations

import glob
import hashlib
import json
import re
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from climbrl.pretrain.config import DataConfig, FileSource


@dataclass
class Doc:
    """One document on its way through the pipeline."""

    text: str
    domain: str = "default"
    ids: list[int] | None = None  # token ids, filled by the tokenize step

    @property
    def n_tokens(self) -> int:
        return len(self.ids) if self.ids is not None else 0


@dataclass
class StageStats:
    """Documents and tokens into and out of one stage."""

    name: str
    docs_in: int = 0
    docs_out: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Funnel:
    """The per-stage counts of one pipeline run."""

    stages: list[StageStats] = field(default_factory=list)

    def stage(self, name: str) -> StageStats:
        s = StageStats(name)
        self.stages.append(s)
        return s

    def to_dict(self) -> list[dict[str, Any]]:
        return [asdict(s) for s in self.stages]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))

    def print(self) -> None:
        from rich.console import Console
        from rich.table import Table

        t = Table(title="data funnel")
        for col in ("stage", "docs in", "docs out", "tokens in", "tokens out", "kept tokens"):
            t.add_column(col, justify="left" if col == "stage" else "right")
        for s in self.stages:
            kept = f"{s.tokens_out / s.tokens_in:.1%}" if s.tokens_in else "-"
            t.add_row(
                s.name,
                f"{s.docs_in:,}",
                f"{s.docs_out:,}",
                f"{s.tokens_in:,}",
                f"{s.tokens_out:,}",
                kept,
            )
        Console(stderr=True).print(t)


def filter_stage(
    docs: Iterable[Doc], keep: Callable[[Doc], bool], stats: StageStats
) -> Iterator[Doc]:
    """Yield the docs `keep` accepts, counting in and out."""
    for d in docs:
        stats.docs_in += 1
        stats.tokens_in += d.n_tokens
        if keep(d):
            stats.docs_out += 1
            stats.tokens_out += d.n_tokens
            yield d


# ---------------------------------------------------------------- reading


def expand_paths(patterns: list[str]) -> list[Path]:
    out: list[Path] = []
    for pat in patterns:
        hits = sorted(glob.glob(pat)) if any(c in pat for c in "*?[") else [pat]
        for h in hits:
            if not Path(h).is_file():
                raise ValueError(f"data file {h!r} does not exist")
            out.append(Path(h))
    if not out:
        raise ValueError(f"no files match {patterns}")
    return out


def read_texts(path: Path, text_field: str = "text") -> Iterator[str]:
    """Stream the documents of one file."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        block: list[str] = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    block.append(line.rstrip("\n"))
                elif block:
                    yield "\n".join(block)
                    block = []
        if block:
            yield "\n".join(block)
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for i, line in enumerate(f):
                if line.strip():
                    obj = json.loads(line)
                    if text_field not in obj:
                        raise ValueError(f"{path}:{i + 1} has no field {text_field!r}")
                    yield str(obj[text_field])
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        if text_field not in pf.schema_arrow.names:
            raise ValueError(f"{path} has no column {text_field!r} (has {pf.schema_arrow.names})")
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for v in batch.column(0).to_pylist():
                if v is not None:
                    yield str(v)
    else:
        raise ValueError(f"{path}: unsupported file type {suffix!r} (use .txt, .jsonl or .parquet)")


def read_source(src: FileSource) -> Iterator[Doc]:
    for p in expand_paths(src.paths):
        for text in read_texts(p, src.text_field):
            yield Doc(text, src.domain)


def tokenize_stage(docs: Iterable[Doc], tokenizer: Any, stats: StageStats) -> Iterator[Doc]:
    """Attach token ids (the count every later stage reports)."""
    for d in docs:
        d.ids = tokenizer(d.text, add_special_tokens=False)["input_ids"]
        stats.docs_in += 1
        stats.docs_out += 1
        stats.tokens_in += d.n_tokens
        stats.tokens_out += d.n_tokens
        yield d


# ---------------------------------------------------------------- dedup

_WS = re.compile(r"\s+")
_WORD = re.compile(r"\w+", re.UNICODE)


def normalise(text: str) -> str:
    return _WS.sub(" ", text.strip().lower())


class ExactDedup:
    """Keeps the first document of each normalised text (128-bit blake2b)."""

    def __init__(self) -> None:
        self.seen: set[bytes] = set()

    def __call__(self, d: Doc) -> bool:
        h = hashlib.blake2b(normalise(d.text).encode(), digest_size=16).digest()
        if h in self.seen:
            return False
        self.seen.add(h)
        return True


def shingles(text: str, n: int) -> set[bytes]:
    words = _WORD.findall(text.lower())
    if len(words) <= n:
        return {" ".join(words).encode()}
    return {" ".join(words[i : i + n]).encode() for i in range(len(words) - n + 1)}


class FuzzyDedup:
    """MinHash-LSH near-duplicate filter: drops a doc whose Jaccard with a kept doc >= threshold."""

    def __init__(
        self, threshold: float = 0.8, num_perm: int = 128, shingle_words: int = 5, seed: int = 1
    ):
        from datasketch import MinHashLSH

        self.threshold = threshold
        self.num_perm = num_perm
        self.n = shingle_words
        self.seed = seed
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.kept: dict[Hashable, Any] = {}  # MinHashLSH key -> MinHash

    def __call__(self, d: Doc) -> bool:
        from datasketch import MinHash

        m = MinHash(num_perm=self.num_perm, seed=self.seed)
        m.update_batch(list(shingles(d.text, self.n)))
        for key in self.lsh.query(m):
            if self.kept[key].jaccard(m) >= self.threshold:
                return False
        key = len(self.kept)
        self.kept[key] = m
        self.lsh.insert(key, m)
        return True


# ---------------------------------------------------------------- quality


def symbol_ratio(text: str) -> float:
    """Share of characters that are neither alphanumeric nor whitespace."""
    if not text:
        return 0.0
    sym = sum(1 for c in text if not (c.isalnum() or c.isspace()))
    return sym / len(text)


def dup_ngram_fraction(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier n-gram of the same doc."""
    words = text.lower().split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


class QualityFilter:
    """Heuristic (Gopher-style) filters; `reasons` counts why docs were dropped."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.reasons: dict[str, int] = {"length": 0, "symbols": 0, "repetition": 0}

    def __call__(self, d: Doc) -> bool:
        c = self.cfg
        if not (c.min_chars <= len(d.text) <= c.max_chars):
            self.reasons["length"] += 1
            return False
        if symbol_ratio(d.text) > c.max_symbol_ratio:
            self.reasons["symbols"] += 1
            return False
        if dup_ngram_fraction(d.text) > c.max_dup_ngram_frac:
            self.reasons["repetition"] += 1
            return False
        return True


# ---------------------------------------------------------------- decontamination


def _words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


class Decontaminator:
    """Drops docs that share a word n-gram with any eval item (items shorter than n: whole item)."""

    def __init__(self, eval_texts: Iterable[str], n: int = 8) -> None:
        self.n = n
        self.grams: dict[int, set[tuple[str, ...]]] = {}
        for t in eval_texts:
            w = _words(t)
            k = min(n, len(w))
            if k == 0:
                continue
            bucket = self.grams.setdefault(k, set())
            bucket.update(tuple(w[i : i + k]) for i in range(len(w) - k + 1))

    def __call__(self, d: Doc) -> bool:
        w = _words(d.text)
        for k, bucket in self.grams.items():
            for i in range(len(w) - k + 1):
                if tuple(w[i : i + k]) in bucket:
                    return False
        return True


# ---------------------------------------------------------------- mixing


def mix(
    streams: dict[str, Iterator[Doc]],
    weights: dict[str, float],
    stats: StageStats,
    on_exhaust: str = "stop",
) -> Iterator[Doc]:
    """Interleave domain streams so that domain d gets weights[d] / sum(weights) of the tokens.

    Deterministic: the next doc comes from the live domain furthest below its share
    (smallest tokens_d / weight_d). With ``on_exhaust='stop'`` the mix ends when the domain due
    next runs dry, which keeps the proportions; ``'continue'`` goes on with the others.
    """
    live = dict(streams)
    tokens = dict.fromkeys(streams, 0)
    docs = dict.fromkeys(streams, 0)
    while live:
        d_name = min(live, key=lambda k: (tokens[k] / weights[k], k))
        doc = next(live[d_name], None)
        if doc is None:
            if on_exhaust == "stop":
                break
            del live[d_name]
            continue
        tokens[d_name] += doc.n_tokens
        docs[d_name] += 1
        stats.docs_in += 1
        stats.docs_out += 1
        stats.tokens_in += doc.n_tokens
        stats.tokens_out += doc.n_tokens
        yield doc
    total = sum(tokens.values()) or 1
    stats.extra["token_share"] = {k: tokens[k] / total for k in tokens}
    stats.extra["target_share"] = {k: weights[k] / sum(weights.values()) for k in weights}
    stats.extra["docs"] = docs


# ---------------------------------------------------------------- packing


@dataclass
class Packed:
    """Fixed-length rows: `tokens` and per-document `positions` (both [rows, seq_len])."""

    tokens: np.ndarray
    positions: np.ndarray

    def save(self, out_dir: str | Path, name: str) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / f"{name}_tokens.npy", self.tokens)
        np.save(out / f"{name}_positions.npy", self.positions)

    @classmethod
    def load(cls, out_dir: str | Path, name: str) -> Packed:
        out = Path(out_dir)
        return cls(np.load(out / f"{name}_tokens.npy"), np.load(out / f"{name}_positions.npy"))


class Packer:
    """Greedy packing of docs (+EOS) into rows of `seq_len`; a doc that overflows continues,
    from position 0, in the next row. The last row is padded with `pad_id`."""

    def __init__(self, seq_len: int, eos_id: int, pad_id: int) -> None:
        self.seq_len, self.eos_id, self.pad_id = seq_len, eos_id, pad_id
        self.rows_t: list[np.ndarray] = []
        self.rows_p: list[np.ndarray] = []
        self.buf_t: list[int] = []
        self.buf_p: list[int] = []

    def add(self, ids: list[int]) -> None:
        ids = list(ids) + [self.eos_id]
        pos = 0
        while ids:
            room = self.seq_len - len(self.buf_t)
            take = ids[:room]
            self.buf_t.extend(take)
            self.buf_p.extend(range(pos, pos + len(take)))
            ids = ids[room:]
            pos = 0  # the continuation starts a new segment in the next row
            if len(self.buf_t) == self.seq_len:
                self._flush()

    def _flush(self) -> None:
        self.rows_t.append(np.asarray(self.buf_t, dtype=np.int32))
        self.rows_p.append(np.asarray(self.buf_p, dtype=np.int32))
        self.buf_t, self.buf_p = [], []

    def finish(self) -> Packed:
        if self.buf_t:
            n = self.seq_len - len(self.buf_t)
            self.buf_t.extend([self.pad_id] * n)
            self.buf_p.extend(range(n))  # a separate (masked) segment
            self._flush()
        if not self.rows_t:
            return Packed(
                np.zeros((0, self.seq_len), np.int32), np.zeros((0, self.seq_len), np.int32)
            )
        return Packed(np.stack(self.rows_t), np.stack(self.rows_p))


def pack_docs(token_lists: Iterable[list[int]], seq_len: int, eos_id: int, pad_id: int) -> Packed:
    p = Packer(seq_len, eos_id, pad_id)
    for ids in token_lists:
        p.add(ids)
    return p.finish()


def labels_for(tokens: np.ndarray, positions: np.ndarray, pad_id: int) -> np.ndarray:
    """Next-token targets; -100 where the next token starts a new document, is padding, or is
    past the row end."""
    labels = np.full_like(tokens, -100, dtype=np.int64)
    nxt_t, nxt_p = tokens[..., 1:], positions[..., 1:]
    same_doc = nxt_p != 0
    labels[..., :-1] = np.where(same_doc & (nxt_t != pad_id), nxt_t, -100)
    return labels


def is_eval_doc(text: str, fraction: float) -> bool:
    h = int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


# ---------------------------------------------------------------- the pipeline


def run_pipeline(
    cfg: DataConfig, tokenizer: Any, out_dir: str | Path, *, quiet: bool = False
) -> Funnel:
    """Run every stage over `cfg.files`, pack into ``out_dir/{train,eval}_*.npy``, save the
    funnel. The tokenizer must already exist (see `train_tokenizer_on_files`)."""
    funnel = Funnel()
    s_read = funnel.stage("read+tokenize")
    s_exact = funnel.stage("exact dedup") if cfg.exact_dedup else None
    s_fuzzy = funnel.stage(f"fuzzy dedup (J>={cfg.fuzzy_threshold})") if cfg.fuzzy_dedup else None
    s_quality = funnel.stage("quality filters")
    s_decon = funnel.stage("decontamination") if cfg.decontam_files else None
    s_mix = funnel.stage("domain mix")

    exact = ExactDedup()
    fuzzy = (
        FuzzyDedup(cfg.fuzzy_threshold, cfg.minhash_perm, cfg.shingle_words)
        if cfg.fuzzy_dedup
        else None
    )
    quality = QualityFilter(cfg)
    decon = None
    if cfg.decontam_files:
        eval_texts = (t for p in expand_paths(cfg.decontam_files) for t in read_texts(p))
        decon = Decontaminator(eval_texts, cfg.decontam_ngram)

    def domain_stream(sources: list[FileSource]) -> Iterator[Doc]:
        docs: Iterator[Doc] = (d for s in sources for d in read_source(s))
        docs = tokenize_stage(docs, tokenizer, s_read)
        if s_exact is not None:
            docs = filter_stage(docs, exact, s_exact)
        if s_fuzzy is not None and fuzzy is not None:
            docs = filter_stage(docs, fuzzy, s_fuzzy)
        docs = filter_stage(docs, quality, s_quality)
        if s_decon is not None and decon is not None:
            docs = filter_stage(docs, decon, s_decon)
        return docs

    by_domain: dict[str, list[FileSource]] = {}
    weights: dict[str, float] = {}
    for src in cfg.files:
        by_domain.setdefault(src.domain, []).append(src)
        weights[src.domain] = weights.get(src.domain, 0.0) + src.weight
    streams = {d: domain_stream(srcs) for d, srcs in by_domain.items()}
    mixed = mix(streams, weights, s_mix, cfg.mix_on_exhaust)

    s_pack = funnel.stage(f"pack (seq_len={cfg.seq_len})")
    train_p = Packer(cfg.seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id)
    eval_p = Packer(cfg.seq_len, tokenizer.eos_token_id, tokenizer.pad_token_id)
    for d in mixed:
        assert d.ids is not None
        s_pack.docs_in += 1
        s_pack.tokens_in += d.n_tokens
        (eval_p if is_eval_doc(d.text, cfg.eval_fraction) else train_p).add(d.ids)
    train, ev = train_p.finish(), eval_p.finish()
    s_pack.docs_out = s_pack.docs_in
    s_pack.tokens_out = int(
        (train.tokens != tokenizer.pad_token_id).sum() + (ev.tokens != tokenizer.pad_token_id).sum()
    )
    s_pack.extra = {
        "train_rows": len(train.tokens),
        "eval_rows": len(ev.tokens),
        "note": "tokens out include one EOS per doc",
    }
    s_quality.extra["dropped_by"] = quality.reasons

    out = Path(out_dir)
    train.save(out, "train")
    ev.save(out, "eval")
    funnel.save(out / "funnel.json")
    if not quiet:
        funnel.print()
    return funnel


def train_tokenizer_on_files(cfg: DataConfig, out_dir: str | Path) -> Any:
    """Train the BPE tokenizer on the first `tokenizer_train_docs` docs of the inputs."""
    from itertools import islice

    from climbrl.tokenizer import train_bpe_tokenizer

    texts = islice((d.text for s in cfg.files for d in read_source(s)), cfg.tokenizer_train_docs)
    return train_bpe_tokenizer(texts, cfg.vocab_size, out_dir, split_digits=cfg.split_digits)


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Run the data pipeline on local files.")
    ap.add_argument("out_dir")
    ap.add_argument("files", nargs="+")
    ap.add_argument("--tokenizer", default=None, help="tokenizer dir (default: train one)")
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=4096)
    a = ap.parse_args(argv)
    from transformers import AutoTokenizer

    cfg = DataConfig(
        source="files",
        files=[FileSource(paths=a.files)],
        seq_len=a.seq_len,
        vocab_size=a.vocab_size,
    )
    tok = (
        AutoTokenizer.from_pretrained(a.tokenizer)
        if a.tokenizer
        else train_tokenizer_on_files(cfg, Path(a.out_dir) / "tokenizer")
    )
    run_pipeline(cfg, tok, a.out_dir)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
