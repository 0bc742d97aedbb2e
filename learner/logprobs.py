"""Per-token log-probs and entropy of sampled completions under the learner's model.

Matches what the engine reports as ``processed_logprobs``: log softmax of the logits / T after
the sampler's top-p/top-k filter, with the LM head in float32 (``fp32_head``, like the engine:
vLLM's CPU sampler works in float32). Train = inference replay (``climbrl.learner.replay``):

- ``replay_mask``: the top-p/top-k kept set recorded per token (``Sample.keep_counts``) is
  applied before the log-softmax. The learner's kept set is its own top-n (n = the recorded
  count) union the sampled token y, so log pi(y) = log(p_y / sum_{top-n u {y}} p) is always
  finite. At lag 0 y is inside the top-n (the sampler's distribution is the learner's) and
  this is exactly the engine's value; at lag >= 1 the newer weights may rank y below the
  n-th, a replay miss: y is still trained, over the top-n and y, and counted in
  ``replay_miss``. Dropping it instead would take it out of the loss numerator while the
  denominators (``BatchNorm``, fixed from the token counts before the forward) still count it;
- ``replay_routing``: for MoE models the experts recorded per position and layer
  (``Sample.routing``) are forced in the forward pass.

Each applies only when the samples carry the record. Only completion positions are projected
through the LM head, by default through ``climbrl.kernels`` (chunked, never the full
[tokens x vocab] logits); ``impl="naive"`` is the plain-torch path.

The reference model of the KL term replays neither (``reference_logprobs``): both records
describe the policy that sampled, and pi_ref is the reference's own full distribution.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from climbrl.kernels import token_logprobs_and_entropy
from climbrl.learner.device import lm_head_scope
from climbrl.learner.replay import (
    forced_routing,
    keep_counts_BT,
    keep_mask_with_targets,
    model_moe_shape,
    routing_BLNK,
)


def head_logprobs(
    hidden_NH: Tensor,
    weight_VH: Tensor,
    targets_N: Tensor,
    temperature: float,
    impl: str,
    keep_count_N: Tensor | None = None,
    fp32_head: bool = True,
) -> tuple[Tensor, Tensor]:
    with lm_head_scope(hidden_NH.device.type, fp32_head):  # float32 under bf16 autocast too
        return token_logprobs_and_entropy(
            hidden_NH,
            weight_VH,
            targets_N,
            temperature=temperature,
            keep_count_N=keep_count_N,
            fp32_head=fp32_head,
            impl=impl,
        )


def pack_positions(samples: list[Any]) -> tuple[Tensor, Tensor, Tensor]:
    """(input_ids_BL, attention_BL, pos_BT) of the padded ``layout``: right-padded
    prompt+completion inputs (the last token dropped); ``pos_BT`` is the input position whose
    hidden state predicts completion token t (0 past a completion's end). The PPO critic's
    own forwards use it."""
    lay = layout(samples)
    assert lay.attn_RL is not None  # the padded layout has an attention mask
    L = lay.ids_RL.shape[1]
    pos = (lay.index_BT - torch.arange(len(samples)).unsqueeze(1) * L).clamp(min=0)
    return lay.ids_RL, lay.attn_RL, pos


@dataclass
class Layout:
    """Where each sample's tokens sit in the model's input. The inputs are prompt + completion
    with the last token dropped; ``index_BT`` is the flat position (row * row_len + column)
    whose hidden state predicts completion token t (0 past a completion's end).

    Padded (``pack_length = 0``): one row per sample, right-padded, with an attention mask.
    Packed: samples laid end to end in rows of up to ``pack_length`` tokens (first-fit
    decreasing; a longer sample gets a row of its own), no attention mask, ``position_ids``
    restarting at 0 for each sample. transformers' Llama/Qwen classes read restarting
    position ids as packed sequences and attend within each one (``find_packed_sequence_indices``
    in ``transformers.masking_utils``); a row's unused tail is one more such block, so it
    attends only to itself and nothing reads it.

    Shared prompts (``shared_prompt_layout``): the samples of a group share one prompt, so a
    row holds the prompt once, then each sample's completion; a 4-D mask lets each completion
    attend to the prompt and, causally, to itself, and its position ids continue from the
    prompt's. Every hidden state is the one the sample has alone."""

    ids_RL: Tensor
    attn_RL: Tensor | None  # padded layout only
    posids_RL: Tensor | None  # packed and shared-prompt layouts
    start_B: Tensor  # flat position of each sample's first input token
    len_B: Tensor  # input tokens per sample (prompt + completion - 1)
    index_BT: Tensor
    allowed_RLL: Tensor | None = None  # shared prompts: query row attends to key column

    def model_inputs(self, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
        if self.allowed_RLL is not None:  # an additive mask, which eager and SDPA both take
            mask = torch.zeros(self.allowed_RLL.shape, dtype=dtype, device=self.ids_RL.device)
            mask.masked_fill_(~self.allowed_RLL, torch.finfo(dtype).min)
            return {
                "input_ids": self.ids_RL,
                "position_ids": self.posids_RL,
                "attention_mask": mask.unsqueeze(1),
                "use_cache": False,
            }
        if self.posids_RL is None:
            return {"input_ids": self.ids_RL, "attention_mask": self.attn_RL}
        # no cache: with one, transformers does not look for packed sequences
        return {"input_ids": self.ids_RL, "position_ids": self.posids_RL, "use_cache": False}

    def scatter(self, x_BL: Tensor, fill: int) -> Tensor:
        """Per-sample input-position values [B, L, ...] laid out as [R, row_len, ...]."""
        assert self.allowed_RLL is None, "routing replay runs on the padded or packed layout"
        R, Lr = self.ids_RL.shape
        out = x_BL.new_full((R * Lr, *x_BL.shape[2:]), fill)
        for b, (s, n) in enumerate(zip(self.start_B.tolist(), self.len_B.tolist())):
            out[s : s + n] = x_BL[b, :n]
        return out.view(R, Lr, *x_BL.shape[2:])

    def to(self, dev: torch.device) -> Layout:
        def mv(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.to(dev)

        return Layout(
            self.ids_RL.to(dev),
            mv(self.attn_RL),
            mv(self.posids_RL),
            self.start_B,
            self.len_B,
            self.index_BT.to(dev),
            mv(self.allowed_RLL),
        )


def layout(samples: list[Any], pack_length: int = 0) -> Layout:
    """The padded (``pack_length = 0``) or packed input layout of ``samples`` (``Layout``)."""
    seqs = [list(s.prompt_ids) + list(s.completion_ids)[:-1] for s in samples]
    n_B = [len(x) for x in seqs]
    B, Tc = len(samples), max(len(s.completion_ids) for s in samples)
    if pack_length <= 0:
        rows, Lr = [[b] for b in range(B)], max(n_B)
    else:
        Lr = max(pack_length, max(n_B))
        rows, free = [], []  # first-fit decreasing
        for b in sorted(range(B), key=lambda b: -n_B[b]):
            r = next((r for r, f in enumerate(free) if f >= n_B[b]), None)
            if r is None:
                rows.append([])
                free.append(Lr)
                r = len(rows) - 1
            rows[r].append(b)
            free[r] -= n_B[b]
        Lr = max(sum(n_B[b] for b in row) for row in rows)  # no row longer than it needs
    R = len(rows)
    ids = torch.zeros((R, Lr), dtype=torch.long)
    posids = torch.zeros((R, Lr), dtype=torch.long)
    attn = torch.zeros((R, Lr), dtype=torch.long)
    start = torch.zeros(B, dtype=torch.long)
    for r, row in enumerate(rows):
        c = 0
        for b in row:
            n = n_B[b]
            ids[r, c : c + n] = torch.tensor(seqs[b])
            posids[r, c : c + n] = torch.arange(n)
            attn[r, c : c + n] = 1
            start[b] = r * Lr + c
            c += n
        posids[r, c:] = torch.arange(Lr - c)  # the tail: a block of its own
    index = torch.zeros((B, Tc), dtype=torch.long)
    for b, s in enumerate(samples):
        p0, c = len(s.prompt_ids) - 1, len(s.completion_ids)
        index[b, :c] = start[b] + torch.arange(p0, p0 + c)
    packed = pack_length > 0
    return Layout(
        ids, None if packed else attn, posids if packed else None, start, torch.tensor(n_B), index
    )


def shared_prompt_layout(samples: list[Any], row_tokens: int = 2048) -> Layout | None:
    """Samples with the same prompt (a group) in one row: the prompt once, then each sample's
    completion tokens (the last dropped), each attending to the prompt and causally to itself.
    A group whose row would pass ``row_tokens`` is split over several rows, each with the
    prompt. None when no two samples share a prompt (nothing to save)."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for b, s in enumerate(samples):
        groups.setdefault(tuple(s.prompt_ids), []).append(b)
    if len(groups) == len(samples):
        return None
    rows: list[tuple[tuple[int, ...], list[int]]] = []
    for prompt, members in groups.items():
        row: list[int] = []
        used = len(prompt)
        for b in members:
            n = len(samples[b].completion_ids) - 1
            if row and used + n > row_tokens:
                rows.append((prompt, row))
                row, used = [], len(prompt)
            row.append(b)
            used += n
        rows.append((prompt, row))
    lens = [len(p) + sum(len(samples[b].completion_ids) - 1 for b in row) for p, row in rows]
    R, Lr = len(rows), max(lens)
    B, Tc = len(samples), max(len(s.completion_ids) for s in samples)
    ids = torch.zeros((R, Lr), dtype=torch.long)
    posids = torch.zeros((R, Lr), dtype=torch.long)
    allowed = torch.zeros((R, Lr, Lr), dtype=torch.bool)
    start = torch.zeros(B, dtype=torch.long)
    index = torch.zeros((B, Tc), dtype=torch.long)
    causal = torch.ones(Lr, Lr, dtype=torch.bool).tril()
    for r, (prompt, row) in enumerate(rows):
        P = len(prompt)
        ids[r, :P] = torch.tensor(prompt)
        posids[r, :P] = torch.arange(P)
        allowed[r, :P, :P] = causal[:P, :P]
        c = P
        for b in row:
            comp = list(samples[b].completion_ids)
            n = len(comp) - 1
            ids[r, c : c + n] = torch.tensor(comp[:-1], dtype=torch.long)
            posids[r, c : c + n] = torch.arange(P, P + n)
            allowed[r, c : c + n, :P] = True
            allowed[r, c : c + n, c : c + n] = causal[:n, :n]
            start[b] = r * Lr + c - P  # (the prompt is not this sample's alone)
            index[b, 0] = r * Lr + P - 1  # the prompt's last position predicts token 0
            index[b, 1 : n + 1] = r * Lr + torch.arange(c, c + n)
            c += n
        allowed[r, c:, c:] = causal[: Lr - c, : Lr - c]  # the tail attends to itself
    n_B = torch.tensor([len(s.prompt_ids) + len(s.completion_ids) - 1 for s in samples])
    return Layout(ids, None, posids, start, n_B, index, allowed)


def micro_chunks(samples: list[Any], size: int, tokens: int = 0) -> list[tuple[int, int]]:
    """``(start, n)`` chunks of ``samples`` in order: ``size`` samples each, or with
    ``tokens > 0`` as many as fit in that many prompt + completion tokens (at least one)."""
    if tokens <= 0:
        return [(i, min(size, len(samples) - i)) for i in range(0, len(samples), size)]
    out: list[tuple[int, int]] = []
    start, used = 0, 0
    for i, s in enumerate(samples):
        n = len(s.prompt_ids) + len(s.completion_ids)
        if i > start and used + n > tokens:
            out.append((start, i - start))
            start, used = i, 0
        used += n
    if samples:
        out.append((start, len(samples) - start))
    return out


def completion_logprobs(
    model: Any,
    samples: list[Any],
    temperature: float,
    impl: str = "auto",
    *,
    replay_mask: bool = True,
    replay_routing: bool = True,
    fp32_head: bool = True,
    pack_length: int = 0,
    share_prompts: bool = False,
) -> dict[str, Tensor]:
    """Returns [B, Tc] tensors: logp, entropy, old_logp (the sampler's), mask (trainable),
    and replay_miss (1 on a trainable token outside the learner's own top-n: a newer policy
    than the sampler's, or a boundary near-tie at lag 0), and hidden_BTH, the last hidden
    state that predicts each completion token. A missed token stays in ``mask``; its logp and
    entropy are over the learner's top-n union the token (module docstring).

    ``pack_length > 0`` packs the samples into rows of that many tokens (``layout``) instead
    of padding each to the longest; ``share_prompts`` runs a prompt that several samples share
    once (``shared_prompt_layout``; not with MoE routing replay, whose records are per
    sample). The values are the same up to float rounding."""
    B = len(samples)
    routed = replay_routing and any(getattr(s, "routing", None) is not None for s in samples)
    # the 4-D mask of shared prompts needs an attention that takes one (eager, SDPA)
    mask4d = getattr(model.config, "_attn_implementation", "sdpa") in ("eager", "sdpa")
    shared = shared_prompt_layout(samples) if share_prompts and mask4d and not routed else None
    lay = shared if shared is not None else layout(samples, pack_length)
    Tc = lay.index_BT.shape[1]
    tgt = torch.zeros((B, Tc), dtype=torch.long)
    mask = torch.zeros((B, Tc), dtype=torch.float32)
    old = torch.zeros((B, Tc), dtype=torch.float32)
    for b, s in enumerate(samples):
        c = len(s.completion_ids)
        tgt[b, :c] = torch.tensor(s.completion_ids)
        mask[b, :c] = torch.tensor(s.completion_mask, dtype=torch.float32)
        old[b, :c] = torch.tensor(s.logprobs, dtype=torch.float32)
    keep_BT = keep_counts_BT(samples, Tc) if replay_mask else None
    dev = model.get_input_embeddings().weight.device  # a GPU learner (FSDP on CUDA)
    if dev.type != "cpu":
        lay = lay.to(dev)
        tgt, mask, old = (t.to(dev) for t in (tgt, mask, old))
        keep_BT = None if keep_BT is None else keep_BT.to(dev)
    route: contextlib.AbstractContextManager = contextlib.nullcontext()
    if routed:
        shape = model_moe_shape(model)
        if shape is None:
            raise ValueError(
                "samples carry MoE routing but the learner's model has no MoE "
                "router; is the learner loading the rollout's model?"
            )
        experts = routing_BLNK(samples, int(lay.len_B.max()), *shape)
        if experts is not None:
            experts = lay.scatter(experts, -1)
            route = forced_routing(model, experts if dev.type == "cpu" else experts.to(dev))
    with route:
        hidden_RLH = model.model(**lay.model_inputs(model.dtype)).last_hidden_state
    hidden_BTH = hidden_RLH.reshape(-1, hidden_RLH.shape[-1])[lay.index_BT]
    W = model.get_output_embeddings().weight
    logp, ent = head_logprobs(
        hidden_BTH.reshape(B * Tc, -1),
        W,
        tgt.reshape(-1),
        temperature,
        impl,
        keep_count_N=None if keep_BT is None else keep_BT.reshape(-1),
        fp32_head=fp32_head,
    )
    miss = (mask > 0) & ~torch.isfinite(logp.detach()).view(B, Tc)
    if bool(miss.any()):
        assert keep_BT is not None, "only a replayed kept set can exclude the sampled token"
        idx = miss.reshape(-1).nonzero().squeeze(1)
        h_MH = hidden_BTH.reshape(B * Tc, -1)[idx]
        with lm_head_scope(h_MH.device.type, fp32_head):
            keep_MV = keep_mask_with_targets(
                h_MH, W, tgt.reshape(-1)[idx], keep_BT.reshape(-1)[idx], fp32_head=fp32_head
            )
            logp_M, ent_M = token_logprobs_and_entropy(
                h_MH,
                W,
                tgt.reshape(-1)[idx],
                temperature=temperature,
                keep_mask_NV=keep_MV,
                fp32_head=fp32_head,
                impl=impl,
            )
        logp = logp.index_put((idx,), logp_M.to(logp.dtype))
        ent = ent.index_put((idx,), ent_M.to(ent.dtype))
    logp, ent = logp.view(B, Tc), ent.view(B, Tc)
    zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
    return {
        "logp": torch.where(mask.bool(), logp, zero),
        "entropy": torch.where(torch.isfinite(ent.detach()), ent, zero),
        "old_logp": old,
        "mask": mask,
        "replay_miss": miss.float(),
        "hidden_BTH": hidden_BTH,  # the PPO value head reads the same forward
    }


def reference_logprobs(
    ref: Any,
    samples: list[Any],
    temperature: float,
    impl: str = "auto",
    *,
    fp32_head: bool = True,
    pack_length: int = 0,
    share_prompts: bool = False,
) -> Tensor:
    """[B, Tc] log pi_ref(y_t) of the sampled tokens under the reference model's own full
    distribution, log softmax(logits / T), with neither the rollout's top-p/top-k kept set nor
    its MoE routing replayed; 0 on non-trainable positions.

    The kept set is the sampling policy's: applied to the reference, it would score each token
    over the reference's top-n plus that token, a support chosen by the policy's count, so
    the KL would not be to pi_ref. The full support keeps KL(pi || pi_ref) finite, since
    every token pi can sample has pi_ref > 0."""
    return completion_logprobs(
        ref,
        samples,
        temperature,
        impl,
        replay_mask=False,
        replay_routing=False,
        fp32_head=fp32_head,
        pack_length=pack_length,
        share_prompts=share_prompts,
    )["logp"]
