"""PPO (Schulman et al. 2017) with a learned critic: GAE advantages, the clipped loss, and the
critic that owns its value model, optimizer and value loss.

    delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)        A_t = sum_l (gamma * lam)^l * delta_{t+l}
    L       = clipped surrogate(A_t) + vf_coef * 1/2 * mean_t (V(s_t) - R_t)^2
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from climbrl.learner.algos.common import BatchNorm, StepBatch

# PPO's policy loss is GRPO's token-level clip, on per-token (GAE) advantages
from climbrl.learner.algos.grpo import surrogate as surrogate
from climbrl.learner.logprobs import pack_positions
from climbrl.learner.replay import forced_routing, model_moe_shape, routing_BLNK

# Finish reasons of an episode cut off before it ended: the token budget ("length") or the
# context window ("context", rollout/server.py). GAE bootstraps these from V(s_T).
TRUNCATED = ("length", "context")


def terminal_rewards(reward_B: Tensor, mask_BT: Tensor) -> Tensor:
    """Outcome reward placed on each sample's last trainable token, zero elsewhere."""
    m = mask_BT > 0
    idx = torch.arange(mask_BT.shape[1], device=mask_BT.device).expand_as(mask_BT)
    last_B = torch.where(m, idx, torch.full_like(idx, -1)).max(dim=1).values
    r_BT = torch.zeros(mask_BT.shape, dtype=reward_B.dtype, device=reward_B.device)
    has = last_B >= 0
    r_BT[has.nonzero().squeeze(1), last_B[has]] = reward_B[has]
    return r_BT


def gae(
    rewards_BT: Tensor,
    values_BT: Tensor,
    mask_BT: Tensor,
    gamma: float,
    lam: float,
    bootstrap_B: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over each sample's trainable
    tokens, which are the agent's time steps (env/tool tokens with mask 0 are skipped):

        delta_t = r_t + gamma * V(s_{t+1}) - V(s_t)
        A_t     = sum_l (gamma * lam)^l * delta_{t+l}
        R_t     = A_t + V(s_t)                       (the critic's regression target)

    After the last trainable token T-1 the next value is V(s_T) = ``bootstrap_B``: the critic's
    value of the state after the last token for an episode cut off by the token budget (it did
    not end, so its return goes on past T), 0 for one that terminated. ``bootstrap_B=None`` is
    0 for every sample.

    Samples of different lengths and one rollout per prompt need nothing special: every row is
    its own trajectory. Returns (advantages_BT, returns_BT), zero on masked tokens.
    """
    B, T = mask_BT.shape
    m = mask_BT > 0
    values_BT = values_BT.detach()
    adv_BT = torch.zeros_like(values_BT)
    next_v_B = torch.zeros(B, dtype=values_BT.dtype, device=values_BT.device)
    if bootstrap_B is not None:
        next_v_B = bootstrap_B.detach().to(next_v_B).clone()
    run_B = torch.zeros_like(next_v_B)
    for t in range(T - 1, -1, -1):
        delta_B = rewards_BT[:, t] + gamma * next_v_B - values_BT[:, t]
        new_B = delta_B + gamma * lam * run_B
        run_B = torch.where(m[:, t], new_B, run_B)
        next_v_B = torch.where(m[:, t], values_BT[:, t], next_v_B)
        adv_BT[:, t] = torch.where(m[:, t], new_B, torch.zeros_like(new_B))
    returns_BT = torch.where(m, adv_BT + values_BT, torch.zeros_like(adv_BT))
    return adv_BT, returns_BT


def whiten(x_BT: Tensor, mask_BT: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - mean) / std over the masked entries (PPO's advantage normalisation)."""
    m = mask_BT > 0
    vals = x_BT[m]
    if vals.numel() < 2:
        return torch.where(m, x_BT - vals.mean() if vals.numel() else x_BT, torch.zeros_like(x_BT))
    return torch.where(m, (x_BT - vals.mean()) / (vals.std() + eps), torch.zeros_like(x_BT))


def value_loss(
    values_BT: Tensor,
    returns_BT: Tensor,
    mask_BT: Tensor,
    norm: BatchNorm,
    old_values_BT: Tensor | None = None,
    clip: float = 0.0,
) -> Tensor:
    """Critic regression (PPO, Schulman et al. 2017) over the batch's tokens:

        L_V = 1/2 * mean_t (V(s_t) - R_t)^2

    With ``clip = eps_v > 0`` the value update is clipped around the values V_old the returns
    were computed with (``old_values_BT``; the clipped value loss of OpenAI baselines' PPO2):

        V_clip = V_old + clip(V - V_old, -eps_v, eps_v)
        L_V    = 1/2 * mean_t max( (V - R_t)^2, (V_clip - R_t)^2 )

    The mean is over the whole batch's trainable tokens (``norm.tokens``), as the policy loss.
    """
    m = mask_BT.to(values_BT.dtype)
    sq_BT = (values_BT - returns_BT) ** 2
    if clip > 0:
        if old_values_BT is None:
            raise ValueError(
                "value_loss with clip > 0 needs old_values_BT (the values the "
                "returns were computed with)"
            )
        old_BT = old_values_BT.detach().to(values_BT.dtype)
        v_clip_BT = old_BT + torch.clamp(values_BT - old_BT, -clip, clip)
        sq_BT = torch.maximum(sq_BT, (v_clip_BT - returns_BT) ** 2)
    return 0.5 * (sq_BT * m).sum() / max(norm.tokens, 1.0)


class Critic(nn.Module):
    """V(s_t) at completion positions. ``kind='head'``: a linear value head on the policy's
    last hidden state (shared backbone; the value loss also trains the backbone, weighted by
    ``vf_coef``). ``kind='model'``: a separate value model (the policy's backbone, initialised
    from ``path``) with its own head; nothing is shared.

    V(s_t) is read at the input position of the last token of s_t = prompt + completion[:t],
    the position whose hidden state predicts completion token t (``pack_positions``).

    MoE models: every backbone forward the critic runs itself (``forward_samples``,
    ``state_values``) forces the experts the samples recorded (``Sample.routing``), as
    ``completion_logprobs`` does for the policy, so the values and the log-probs see the same
    routing. With ``kind='head'`` the values trained in the loss come from the policy's own
    forward (``completion_logprobs``' ``hidden_BTH``), under that forced routing already."""

    def __init__(self, kind: str, hidden_size: int, path: str | None = None, dtype: Any = None):
        super().__init__()
        self.kind = kind
        self.backbone: nn.Module | None = None
        if kind == "model":
            from transformers import AutoModelForCausalLM

            assert path is not None, "a separate value model is initialised from model.path"
            self.backbone = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).base_model
        self.head = nn.Linear(hidden_size, 1, dtype=torch.float32)
        # V ~ 0 at start, but not exactly: a zero head would pass no gradient to the backbone
        nn.init.normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def values(self, hidden_BLH: Tensor, pos_BT: Tensor) -> Tensor:
        h_BTH = hidden_BLH.gather(1, pos_BT.unsqueeze(-1).expand(-1, -1, hidden_BLH.shape[-1]))
        return self.head(h_BTH.float()).squeeze(-1)

    def forward_samples(self, samples: list[Any], policy: nn.Module | None = None) -> Tensor:
        """[B, Tc] V(s_t), t < T, by a forward of the value model (or of the policy backbone)."""
        ids_BL, attn_BL, pos_BT = pack_positions(samples)
        return self.values(self._hidden(samples, policy, ids_BL, attn_BL), pos_BT)

    def state_values(
        self, samples: list[Any], policy: nn.Module | None = None
    ) -> tuple[Tensor, Tensor]:
        """([B, Tc] V(s_t) for t < T, [B] V(s_T)) from one forward of the full sequences.

        s_T is the whole sequence, prompt + every completion token; V(s_T) is read at its last
        token, which the engine never ran through the model, so no routing was recorded for
        that position and it keeps the backbone's own experts."""
        _, _, pos_BT = pack_positions(samples)
        seqs = [list(s.prompt_ids) + list(s.completion_ids) for s in samples]
        B, L = len(seqs), max(len(x) for x in seqs)
        ids_BL = torch.zeros((B, L), dtype=torch.long)
        attn_BL = torch.zeros((B, L), dtype=torch.long)
        for b, seq in enumerate(seqs):
            ids_BL[b, : len(seq)] = torch.tensor(seq)
            attn_BL[b, : len(seq)] = 1
        last_B1 = torch.tensor([[len(x) - 1] for x in seqs], dtype=torch.long)
        v_BT1 = self.values(
            self._hidden(samples, policy, ids_BL, attn_BL), torch.cat([pos_BT, last_B1], dim=1)
        )
        return v_BT1[:, :-1], v_BT1[:, -1]

    def _hidden(
        self, samples: list[Any], policy: nn.Module | None, ids_BL: Tensor, attn_BL: Tensor
    ) -> Tensor:
        backbone: Any = self.backbone
        if backbone is None:
            assert policy is not None, "a value head reads the policy's backbone"
            backbone = policy.base_model
        with replayed_routing(backbone, samples, ids_BL.shape[1]):
            return backbone(input_ids=ids_BL, attention_mask=attn_BL).last_hidden_state


def replayed_routing(
    model: nn.Module, samples: list[Any], L: int
) -> contextlib.AbstractContextManager:
    """The experts ``samples`` recorded (``Sample.routing``), forced in ``model``'s MoE routers
    for a [B, L] forward (``climbrl.learner.replay.forced_routing``); nothing when no sample
    carries routing. Positions past the record keep the model's own routing."""
    if not any(getattr(s, "routing", None) is not None for s in samples):
        return contextlib.nullcontext()
    shape = model_moe_shape(model)
    if shape is None:
        raise ValueError(
            "samples carry MoE routing but the critic's model has no MoE router; "
            "is learner.algo.critic loading the rollout's model?"
        )
    experts_BLNK = routing_BLNK(samples, L, *shape)
    assert experts_BLNK is not None  # some sample carries routing
    dev = next(model.parameters()).device
    return forced_routing(model, experts_BLNK.to(dev))


def turn_ends(completion_mask: list[int]) -> list[int]:
    """Index of the last generated token of each model turn: the end of every run of 1s."""
    m = list(completion_mask)
    return [t for t, x in enumerate(m) if x and (t + 1 == len(m) or not m[t + 1])]


def episode_rewards(samples: list[Any], rewards_B: Tensor, mask_BT: Tensor) -> Tensor:
    """[B, T] per-token rewards r_t of PPO's return R_t = sum_l gamma^l r_{t+l}.

    Turn k of a multi-turn episode ends on the last generated token of the k-th run of
    ``completion_mask`` 1s (observation tokens between turns have mask 0, rollout/server.py);
    ``Sample.step_rewards[k]`` is placed there. The episode reward ``rewards_B`` (after
    shaping) is placed on the episode's last generated token, where it adds to the last
    turn's step reward. A row of ``mask_BT`` with no trainable token (left out) gets none."""
    r_BT = terminal_rewards(rewards_B, mask_BT)
    for b, s in enumerate(samples):
        steps = list(getattr(s, "step_rewards", None) or ())
        if not steps or not bool((mask_BT[b] > 0).any()):
            continue
        ends = turn_ends(s.completion_mask)
        if len(ends) != len(steps):
            raise ValueError(
                f"sample {b} ({s.task_id or 'no task id'}) has {len(steps)} step_rewards for "
                f"{len(ends)} model turns: an environment that sets StepResult.step_reward must "
                "set it on every step (0.0 where the step earns nothing)"
            )
        for t, r in zip(ends, steps):
            r_BT[b, t] += r
    return r_BT


class PpoCritic:
    """PPO's critic as one step uses it: the value model (``Critic``) with its AdamW, the values
    and GAE of a batch, the value-loss term of each micro-batch, and its checkpoint files.

    ``algo`` is ``learner.algo`` (the PPO variant), ``optim`` is ``learner.optim`` (weight decay,
    betas and grad clip are the policy's; the learning rate is ``algo.critic_lr``)."""

    def __init__(self, cfg: Any, policy: nn.Module):
        lc = cfg.learner
        self.algo, self.optim = lc.algo, lc.optim
        self.micro_batch_size = lc.micro_batch_size
        dtype = getattr(torch, cfg.model.dtype)
        hidden_size = int(policy.config.hidden_size)  # type: ignore[union-attr]
        self.critic = Critic(self.algo.critic, hidden_size, cfg.model.path, dtype)
        self.opt = torch.optim.AdamW(
            self.critic.parameters(),
            lr=self.algo.critic_lr,
            weight_decay=self.optim.weight_decay,
            betas=tuple(self.optim.adam_betas),
        )

    def prepare_values(self, policy: nn.Module, batch: StepBatch) -> None:
        """The critic's V(s_t) for the whole batch (no grad), the per-token rewards
        (``episode_rewards``), then GAE(gamma, lambda) and whitening. The value after the last
        token is V(s_T) for a truncated episode (finish_reason in ``TRUNCATED``) and 0 for one
        that terminated:

            delta_{T-1} = r_{T-1} + gamma * V(s_T) - V(s_{T-1})
        """
        mb_size = self.micro_batch_size
        T = max(len(s.completion_ids) for s in batch.samples)
        B = len(batch.samples)
        values_BT = torch.zeros(B, T, dtype=torch.float64)
        last_B = torch.zeros(B, dtype=torch.float64)
        mask_BT = torch.zeros(B, T, dtype=torch.float64)
        with torch.no_grad():
            for i in range(0, B, mb_size):
                mb = batch.samples[i : i + mb_size]
                v_BT, v_last_B = self.critic.state_values(mb, policy)
                values_BT[i : i + len(mb), : v_BT.shape[1]] = v_BT.double()
                last_B[i : i + len(mb)] = v_last_B.double()
        for b, s in enumerate(batch.samples):
            mask_BT[b, : len(s.completion_mask)] = torch.tensor(
                s.completion_mask, dtype=torch.float64
            )
        mask_BT *= batch.keep_B.double().unsqueeze(1)
        truncated_B = torch.tensor([s.finish_reason in TRUNCATED for s in batch.samples])
        bootstrap_B = torch.where(truncated_B, last_B, torch.zeros_like(last_B))
        r_BT = episode_rewards(batch.samples, batch.rewards_B, mask_BT)
        values_BT = values_BT * mask_BT
        adv_BT, ret_BT = gae(
            r_BT, values_BT, mask_BT, self.algo.gamma, self.algo.gae_lambda, bootstrap_B
        )
        batch.adv_BT = whiten(adv_BT, mask_BT) if self.algo.adv_whiten else adv_BT
        batch.returns_BT = ret_BT
        batch.values_BT = values_BT

    def value_term(
        self, batch: StepBatch, i: int, b: dict[str, Tensor], mask: Tensor, norm: BatchNorm
    ) -> Tensor:
        """vf_coef x the value loss of samples[i : i + len(b)] (added to the policy loss)."""
        acc, algo = batch.acc, self.algo
        n, Tc = b["logp"].shape
        if self.critic.kind == "head":
            # the policy's own forward (``b["hidden_BTH"]``), under the MoE routing
            # ``completion_logprobs`` forces: the values trained here see the experts the
            # log-probs see, the same ones ``prepare_values`` forces in its own forward
            values = self.critic.head(b["hidden_BTH"].float()).squeeze(-1)
        else:
            values = self.critic.forward_samples(batch.samples[i : i + n])
        assert batch.returns_BT is not None and batch.values_BT is not None  # prepare_values
        ret = batch.returns_BT[i : i + n, :Tc].to(values.dtype)
        old = None
        if algo.value_clip > 0:
            old = batch.values_BT[i : i + n, :Tc].to(values)
        vl = value_loss(values, ret, mask, norm, old, algo.value_clip)
        acc["vloss"] += float(vl.detach())
        acc["vmean"] += float((values.detach() * mask).sum())
        return algo.vf_coef * vl

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def step(self) -> float:
        gn = torch.nn.utils.clip_grad_norm_(self.critic.parameters(), self.optim.grad_clip)
        self.opt.step()
        return float(gn)

    def load(self, ckpt: Path) -> None:
        if (ckpt / "critic.safetensors").is_file():
            from safetensors.torch import load_model

            load_model(self.critic, str(ckpt / "critic.safetensors"))
            self.opt.load_state_dict(torch.load(ckpt / "critic_optimizer.pt", weights_only=True))

    def save(self, folder: Path) -> None:
        """Write the critic (weights + optimizer) into a checkpoint folder being assembled."""
        from safetensors.torch import save_model

        save_model(self.critic, str(folder / "critic.safetensors"))
        torch.save(self.opt.state_dict(), folder / "critic_optimizer.pt")
