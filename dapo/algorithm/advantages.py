"""Group-relative advantages (GRPO / DAPO) as pure tensor functions.

A_i = (R_i - mean(R)) / (std(R) + eps) over the G samples of one prompt, with
the unbiased (N - 1) std as in the reference code; without the std division
when ``algorithm.norm_adv_by_std_in_grpo`` is False (Dr. GRPO). Each sample's
advantage is then spread over its response tokens by ``dapo.algorithm.loss.policy_loss``,
which takes (B,) advantages as well as (B, T).
"""

from __future__ import annotations

import torch


def group_advantages(
    rewards: torch.Tensor, norm_by_std: bool = True, eps: float = 1e-6
) -> torch.Tensor:
    """Per-sample advantages of rewards (num_groups, G) -> (num_groups, G).

    - A constant group (every sample has the same reward) gets exactly 0 for every
      sample: such a group carries no learning signal, and forcing 0 avoids
      rounding residue of ``R - mean`` being amplified by ``1 / eps``.
    - A singleton group (G == 1) has no unbiased std (N - 1 = 0) and no
      baseline other than itself: its advantage is 0.
    Integer rewards are converted to the default float dtype.
    """
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be (num_groups, G), got shape {tuple(rewards.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if not rewards.is_floating_point():
        rewards = rewards.to(torch.get_default_dtype())
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    centred = rewards - rewards.mean(dim=1, keepdim=True)  # (N, G)
    if norm_by_std:
        std = rewards.std(dim=1, unbiased=True, keepdim=True)  # (N, 1)
        centred = centred / (std + eps)
    constant = (rewards.amax(dim=1) == rewards.amin(dim=1)).unsqueeze(1)  # (N, 1)
    return torch.where(constant, torch.zeros_like(centred), centred)
