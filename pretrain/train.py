"""The pretraining loop: data -> model -> (z-loss, balance loss) -> AdamW/Muon -> checkpoints.

One function, `train(cfg)`, reads from the top: prepare data (synthetic task corpus, the file
pipeline, or an existing packed dir), build or load the model, build optimizers and the
schedule, resume from the latest checkpoint if asked, then step, log tokens/s and FLOP/s,
evaluate held-out NLL, checkpoint atomically, and export an HF dir (``run_dir/model``).

Exact resume: the batch for a given row cursor is a pure function of (seed, cursor) - each
epoch is a seeded permutation of the rows - and the checkpoint holds the cursor with the model,
optimizer, scheduler and RNG states, so a run killed with SIGKILL and resumed retraces the same
loss curve.

    climbrl pretrain examples/pretrain_demo.toml [--set train.steps=100] [--resume]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from climbrl.pretrain import model as M
from climbrl.pretrain.checkpoint import load_latest, save_checkpoint, set_rng_state
from climbrl.pretrain.config import PretrainConfig, TrainConfig
from climbrl.pretrain.data import Packed, pack_docs, run_pipeline, train_tokenizer_on_files
from climbrl.pretrain.evaluate import batch_tensors, heldout_nll, task_accuracy
from climbrl.pretrain.synthetic import get_task
from climbrl.progress import Steps


@dataclass
class RunData:
    tokenizer: Any
    train: Packed
    eval: Packed
    replay: Packed | None = None


# ---------------------------------------------------------------- data


def _load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def prepare_data(cfg: PretrainConfig, run_dir: Path, *, quiet: bool = False) -> RunData:
    """Build (once) or reload the packed train/eval rows and the tokenizer for this run."""
    d = cfg.data
    if d.source == "packed":
        assert d.packed_dir is not None
        data_dir = Path(d.packed_dir)
    else:
        data_dir = run_dir / "data"
        if not (data_dir / "READY").exists():
            tmp = run_dir / ".data-tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            _build_data(cfg, tmp, quiet=quiet)
            (tmp / "READY").write_text("ok")
            shutil.rmtree(data_dir, ignore_errors=True)
            os.replace(tmp, data_dir)
    tok_dir = cfg.init.from_dir or d.tokenizer or data_dir / "tokenizer"
    tok = _load_tokenizer(tok_dir)
    replay = Packed.load(cfg.init.replay_dir, "train") if cfg.init.replay_dir else None
    train, ev = Packed.load(data_dir, "train"), Packed.load(data_dir, "eval")
    if replay is not None and replay.tokens.shape[1] != train.tokens.shape[1]:
        raise ValueError(
            f"replay rows are {replay.tokens.shape[1]} tokens long but data.seq_len gives "
            f"{train.tokens.shape[1]}: set data.seq_len to match init.replay_dir"
        )
    if len(train.tokens) == 0:
        raise ValueError(f"no training rows in {data_dir}: the data pipeline kept nothing")
    return RunData(tok, train, ev, replay)


def _build_data(cfg: PretrainConfig, out: Path, *, quiet: bool) -> None:
    d = cfg.data
    if d.source == "synthetic":
        task = get_task(d.task)
        docs = task.corpus(d.num_docs, seed=cfg.train.seed, mistake_rate=d.mistake_rate)
        eval_n = max(200, int(d.num_docs * d.eval_fraction))
        eval_docs = [e.text for e in task.sample("heldout", eval_n, seed=cfg.train.seed)]
        tok = _tokenizer_for(cfg, out, docs[: d.tokenizer_train_docs])
        ids = tok(docs, add_special_tokens=False)["input_ids"]
        eval_ids = tok(eval_docs, add_special_tokens=False)["input_ids"]
        pack_docs(ids, d.seq_len, tok.eos_token_id, tok.pad_token_id).save(out, "train")
        pack_docs(eval_ids, d.seq_len, tok.eos_token_id, tok.pad_token_id).save(out, "eval")
    else:
        if cfg.init.from_dir or d.tokenizer:
            tok = _tokenizer_for(cfg, out, [])
        else:
            tok = train_tokenizer_on_files(d, out / "tokenizer")
        run_pipeline(d, tok, out, quiet=quiet)


def _tokenizer_for(cfg: PretrainConfig, out: Path, texts: list[str]) -> Any:
    from climbrl.tokenizer import train_bpe_tokenizer

    src = cfg.init.from_dir or cfg.data.tokenizer
    if src:
        tok = _load_tokenizer(src)
        tok.save_pretrained(str(out / "tokenizer"))
        return tok
    return train_bpe_tokenizer(
        texts,
        cfg.data.vocab_size,
        out / "tokenizer",
        min_frequency=1,
        split_digits=cfg.data.split_digits,
    )


class RowSampler:
    """Rows for a cursor: epoch e is a permutation seeded by (seed, e); stateless given cursor."""

    def __init__(self, n_rows: int, seed: int) -> None:
        self.n, self.seed = n_rows, seed
        self._perm: tuple[int, np.ndarray] | None = None

    def rows(self, cursor: int, k: int) -> np.ndarray:
        out = np.empty(k, dtype=np.int64)
        for j in range(k):
            epoch, i = divmod(cursor + j, self.n)
            if self._perm is None or self._perm[0] != epoch:
                self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
            out[j] = self._perm[1][i]
        return out


# ---------------------------------------------------------------- optimisation


def lr_factor(step: int, tc: TrainConfig) -> float:
    """Multiplier of the peak lr at `step`: linear warmup, then cosine or WSD decay."""
    if step < tc.warmup_steps:
        return (step + 1) / tc.warmup_steps
    if tc.schedule == "cosine":
        progress = (step - tc.warmup_steps) / max(1, tc.steps - tc.warmup_steps)
        return tc.min_lr_ratio + (1 - tc.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * min(progress, 1.0))
        )
    decay_start = tc.steps - max(1, int(tc.decay_fraction * tc.steps))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, tc.steps - decay_start)
    return 1.0 - (1.0 - tc.min_lr_ratio) * min(progress, 1.0)


def build_optimizers(model: torch.nn.Module, tc: TrainConfig) -> list[torch.optim.Optimizer]:
    """AdamW for everything, or torch.optim.Muon for hidden 2-D matrices + AdamW for the rest
    (embeddings, LM head, norms, routers, 3-D expert tensors)."""
    decay, no_decay, muon = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hidden_matrix = (
            p.ndim == 2
            and "embed_tokens" not in name
            and "lm_head" not in name
            and not name.endswith("gate.weight")
        )
        if tc.optimizer == "muon" and hidden_matrix:
            muon.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    groups = [
        {"params": decay, "weight_decay": tc.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    opts: list[torch.optim.Optimizer] = [
        torch.optim.AdamW(groups, lr=tc.lr, betas=(tc.beta1, tc.beta2), eps=1e-8, fused=True)
    ]
    if muon:
        opts.append(
            torch.optim.Muon(
                muon,
                lr=tc.muon_lr or tc.lr,
                weight_decay=tc.weight_decay,
                adjust_lr_fn="match_rms_adamw",
            )
        )
    return opts


def autocast_ctx(tc: TrainConfig, device: str) -> Any:
    want = tc.dtype if tc.dtype != "auto" else ("bf16" if device == "cuda" else "fp32")
    if want == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def peak_flops(tc: TrainConfig, device: str) -> float:
    if tc.peak_flops:
        return tc.peak_flops
    if device == "cuda":
        name = torch.cuda.get_device_name()
        for key, val in (("H200", 989e12), ("H100", 989e12), ("A100", 312e12), ("L4", 121e12)):
            if key in name:
                return val
    return 0.0


def loss_terms(
    model: Any, ids: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor, z_coef: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean CE over labelled tokens, z-loss = mean logsumexp^2) with an FP32 head."""
    logits_BTV = model(input_ids=ids, position_ids=pos, use_cache=False).logits.float()
    mask_BT = labels != -100
    n = mask_BT.sum().clamp(min=1)
    # One logsumexp serves both CE (lse - target logit) and the z-loss (lse^2).
    lse_BT = torch.logsumexp(logits_BTV, dim=-1)
    tgt_BT = logits_BTV.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    ce = ((lse_BT - tgt_BT) * mask_BT).sum() / n
    zl = (lse_BT.square() * mask_BT).sum() / n if z_coef > 0 else torch.zeros((), device=ids.device)
    return ce, zl


class TrainStep:
    """One optimizer step of the loop: `micro` (forward, loss, backward) per micro-batch, then
    `finish` (clip, optimizer steps, zero grads). `step(ids, pos, labels)` does both for a
    single micro-batch (what benchmarks/pretrain.py times).

    With ``tc.compile`` the forward and the loss go through ``torch.compile`` (fixed shapes:
    rows are packed to one length, so one graph serves every step).
    """

    def __init__(
        self,
        model: Any,
        opts: list[torch.optim.Optimizer],
        tc: TrainConfig,
        device: str,
        balance: Any = None,
        aux_coef: float = 0.0,
    ) -> None:
        self.model, self.opts, self.tc = model, opts, tc
        self.amp = autocast_ctx(tc, device)
        self.amp_dtype = getattr(self.amp, "fast_dtype", None)
        self.balance = balance  # () -> MoE balance loss or None, read after each forward
        self.aux_coef = aux_coef
        self._loss = loss_terms
        if tc.compile and M.routers(model):
            warnings.warn("train.compile is for dense models; this MoE runs eagerly", stacklevel=2)
        elif tc.compile:
            self._loss = torch.compile(loss_terms, dynamic=False)

    def micro(
        self, ids: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor, scale: float = 1.0
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        with self.amp:
            ce, zl = self._loss(self.model, ids, pos, labels, self.tc.z_loss)
            aux = self.balance() if self.balance is not None else None
        loss = ce + self.tc.z_loss * zl
        if aux is not None:
            loss = loss + self.aux_coef * aux
        (loss * scale).backward()
        return ce.detach(), zl.detach(), aux.detach() if aux is not None else None

    def finish(self) -> torch.Tensor:
        tc = self.tc
        gnorm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")
        )
        for o in self.opts:
            o.step()
        for o in self.opts:
            o.zero_grad(set_to_none=True)
        return gnorm

    def __call__(self, ids: torch.Tensor, pos: torch.Tensor, labels: torch.Tensor) -> None:
        self.micro(ids, pos, labels)
        self.finish()


# ---------------------------------------------------------------- the loop


def train(cfg: PretrainConfig, *, resume: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Run (or resume) a pretraining run; returns the summary also written to summary.json."""
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet)
    tc = cfg.train
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(cfg.model_dump_json(indent=2))
    if tc.threads:
        torch.set_num_threads(tc.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t_start = time.perf_counter()

    data = prepare_data(cfg, run_dir, quiet=quiet)
    data_seconds = time.perf_counter() - t_start
    console.print(f"data ready in {data_seconds:.1f}s")
    tok = data.tokenizer
    if cfg.init.from_dir:
        model = M.load_model(cfg.init.from_dir, cfg.model)
    else:
        model = M.build_model(
            cfg.model,
            vocab_size=len(tok),
            eos_id=tok.eos_token_id,
            pad_id=tok.pad_token_id,
            seed=tc.seed,
        )
    model.to(device).train()
    opts = build_optimizers(model, tc)
    # The schedule reads `plan`, whose step count fit_steps_to_budget may lower once.
    plan = tc.model_copy()
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: lr_factor(s, plan)) for o in opts]
    amp = autocast_ctx(tc, device)

    stepper = TrainStep(
        model,
        opts,
        tc,
        device,
        balance=lambda: M.balance_loss(model, cfg.model),
        aux_coef=cfg.model.aux_loss_coef,
    )
    seq_len = data.train.tokens.shape[1]
    count_flops = M.train_flops_counter(model)
    peak = peak_flops(tc, device)
    n_replay = round(tc.batch_size * cfg.init.replay_ratio) if data.replay is not None else 0
    main_rows = RowSampler(len(data.train.tokens), tc.seed)
    replay_rows = (
        RowSampler(len(data.replay.tokens), tc.seed + 1) if data.replay is not None else None
    )

    step, cursor, replay_cursor, elapsed_before = 0, 0, 0, 0.0
    metrics_path = run_dir / "metrics.jsonl"
    ckpt_root = run_dir / "checkpoints"
    if resume and (ck := load_latest(ckpt_root)) is not None:
        tensors, meta = ck
        model.load_state_dict(tensors["model"])
        for o, s in zip(opts, tensors["optimizers"], strict=True):
            o.load_state_dict(s)
        for sc, s in zip(scheds, tensors["schedulers"], strict=True):
            sc.load_state_dict(s)
        M.set_router_biases(model, tensors["router_biases"])
        set_rng_state(tensors["rng"])
        step, cursor, replay_cursor = meta["step"], meta["cursor"], meta["replay_cursor"]
        elapsed_before = meta["elapsed"]
        plan.steps = meta["planned_steps"]
        # Drop log lines the killed run wrote after this checkpoint.
        if metrics_path.exists():
            keep = [
                ln
                for ln in metrics_path.read_text().splitlines()
                if json.loads(ln).get("step", 0) <= step
            ]
            metrics_path.write_text("".join(ln + "\n" for ln in keep))
        console.print(f"[green]resumed[/] from step {step} (cursor {cursor})")
    elif metrics_path.exists():
        metrics_path.unlink()

    def checkpoint() -> None:
        save_checkpoint(
            ckpt_root,
            step,
            {
                "model": model.state_dict(),
                "optimizers": [o.state_dict() for o in opts],
                "schedulers": [s.state_dict() for s in scheds],
                "router_biases": M.router_biases(model),
            },
            {
                "cursor": cursor,
                "replay_cursor": replay_cursor,
                "elapsed": elapsed_before + time.perf_counter() - t_loop,
                "planned_steps": plan.steps,
            },
            tc.keep_checkpoints,
        )

    def log(rec: dict[str, Any]) -> None:
        with open(metrics_path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    n_params, n_active = M.matmul_params(model)
    hf_config: Any = model.config  # a transformers config (nn.Module types it Tensor | Module)
    console.print(
        f"model {hf_config.model_type}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M params "
        f"({n_active / 1e6:.2f}M active in matmuls), {len(data.train.tokens):,} train rows x {seq_len}"
    )
    t_loop = time.perf_counter()
    step0 = step
    t_int, tok_int, flops_int, flops_total = time.perf_counter(), 0, 0.0, 0.0
    last_nll: float | None = None
    stopped_early = False
    # a live bar with an ETA on a terminal; the log lines print either way (above the bar)
    progress = Steps("pretraining", plan.steps, console, completed=step, live=not quiet)
    with progress:
        while step < plan.steps:
            ce_sum = z_sum = aux_sum = 0.0
            for _ in range(tc.grad_accum):
                rows = main_rows.rows(cursor, tc.batch_size - n_replay)
                cursor += len(rows)
                toks, poss = data.train.tokens[rows], data.train.positions[rows]
                if replay_rows is not None and data.replay is not None and n_replay:
                    r = replay_rows.rows(replay_cursor, n_replay)
                    replay_cursor += n_replay
                    toks = np.concatenate([toks, data.replay.tokens[r]])
                    poss = np.concatenate([poss, data.replay.positions[r]])
                ids, pos, labels = batch_tensors(toks, poss, tok.pad_token_id, device)
                ce, zl, aux = stepper.micro(ids, pos, labels, 1.0 / tc.grad_accum)
                ce_sum += ce.item() / tc.grad_accum
                z_sum += zl.item() / tc.grad_accum
                aux_sum += aux.item() / tc.grad_accum if aux is not None else 0.0
                tok_int += ids.numel()
                flops_int += count_flops(poss)
            gnorm = stepper.finish()
            for s in scheds:
                s.step()
            moe_stats = M.end_step_balance(model, cfg.model)
            step += 1
            progress.update(step)
            if tc.fit_steps_to_budget and tc.max_seconds and step == 10 and elapsed_before == 0.0:
                per_step = (time.perf_counter() - t_loop) / step
                fit = step + int(0.95 * (tc.max_seconds - per_step * step) / per_step)
                plan.steps = max(min(tc.steps, fit), tc.warmup_steps + 1, step)
                progress.update(step, total=plan.steps)
                progress.log(
                    f"{per_step:.2f}s/step: planning {plan.steps} steps "
                    f"to fit {tc.max_seconds:.0f}s"
                )

            if step % tc.log_every == 0 or step == plan.steps:
                dt = time.perf_counter() - t_int
                tps = tok_int / dt
                rec = {
                    "step": step,
                    "loss": ce_sum,
                    "z_loss": z_sum,
                    "aux_loss": aux_sum,
                    "lr": scheds[0].get_last_lr()[0],
                    "grad_norm": float(gnorm),
                    "tokens_per_s": tps,
                    "flops_per_s": flops_int / dt,
                    **moe_stats,
                }
                if peak:
                    rec["mfu"] = rec["flops_per_s"] / peak
                log(rec)
                progress.log(
                    f"step {step:6d} loss {ce_sum:.4f} lr {rec['lr']:.2e} "
                    f"gnorm {rec['grad_norm']:.2f} "
                    f"{tps:,.0f} tok/s {rec['flops_per_s'] / 1e9:.2f} GFLOP/s"
                    + (f" mfu {rec['mfu']:.1%}" if peak else "")
                )
                flops_total += flops_int
                t_int, tok_int, flops_int = time.perf_counter(), 0, 0.0
            if step % tc.eval_every == 0 and len(data.eval.tokens):
                last_nll = heldout_nll(
                    model,
                    data.eval,
                    tok.pad_token_id,
                    batch_size=tc.batch_size,
                    max_batches=tc.eval_batches,
                    device=device,
                    autocast=amp,
                )
                log({"step": step, "eval_nll": last_nll})
                progress.log(f"step {step:6d} [cyan]held-out NLL {last_nll:.4f}[/]")
            if step % tc.ckpt_every == 0 or step == plan.steps:
                checkpoint()
            if (
                tc.max_seconds
                and elapsed_before + time.perf_counter() - t_loop > tc.max_seconds
                and step < plan.steps
            ):
                progress.log(
                    f"[yellow]time budget of {tc.max_seconds:.0f}s reached at step {step}[/]"
                )
                checkpoint()
                stopped_early = True
                break

    train_seconds = elapsed_before + time.perf_counter() - t_loop
    if len(data.eval.tokens):
        last_nll = heldout_nll(
            model,
            data.eval,
            tok.pad_token_id,
            batch_size=tc.batch_size,
            max_batches=tc.eval_batches,
            device=device,
            autocast=amp,
        )
    export_dir = run_dir / "model"
    M.export(model, tok, str(export_dir))
    summary: dict[str, Any] = {
        "steps": step,
        "stopped_early": stopped_early,
        "data_seconds": data_seconds,
        "train_seconds": train_seconds,
        "tokens": step * tc.batch_size * tc.grad_accum * seq_len,
        "tokens_per_s": step * tc.batch_size * tc.grad_accum * seq_len / max(train_seconds, 1e-9),
        "eval_nll": last_nll,
        "params": sum(p.numel() for p in model.parameters()),
        "matmul_params_active": n_active,
        "model_dir": str(export_dir),
    }
    # Useful FLOPs (document-masked attention) of the steps this process ran; a resumed run
    # counts only its own part.
    flops_total += flops_int
    run_tokens = max(1, (step - step0) * tc.batch_size * tc.grad_accum * seq_len)
    summary["train_flops_per_token"] = flops_total / run_tokens
    summary["flops_per_s"] = flops_total / max(train_seconds - elapsed_before, 1e-9)
    if cfg.data.source == "synthetic" and cfg.eval_task_examples:
        acc = task_accuracy(
            model, tok, get_task(cfg.data.task), cfg.eval_task_examples, seed=tc.seed + 7
        )
        summary["heldout_accuracy"] = acc["accuracy"]
        summary["heldout_samples"] = acc["samples"]
        console.print(f"[bold]held-out {cfg.data.task} accuracy (greedy): {acc['accuracy']:.1%}[/]")
    summary["wall_seconds"] = time.perf_counter() - t_start
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"exported {export_dir}  (held-out NLL {last_nll})")
    return summary
