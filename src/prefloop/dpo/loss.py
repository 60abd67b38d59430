"""The DPO pair losses: one small function per TRL loss type, from summed log-probs.

For a batch of B pairs (x, y_w, y_l), the trainer gives each function the log-ratios

    chosen   = log πθ(y_w|x) − log π_ref(y_w|x)      (B,)
    rejected = log πθ(y_l|x) − log π_ref(y_l|x)      (B,)

and each returns the per-pair loss (B,). DPO (Rafailov et al. 2023, eq. 7) is

    L_DPO = −log σ(β · (chosen − rejected))

The batch loss is the mean over pairs, so the trainer may sum chunks of pairs scaled by |chunk| / B.
The terms are TRL 1.16's (`DPOTrainer._compute_loss`); tests compare the losses within 1e-5.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def sigmoid(chosen: Tensor, rejected: Tensor, beta: float, **_: Any) -> Tensor:
    """DPO: −log σ(β(c − r))  (Rafailov et al. 2023, eq. 7)."""
    return -F.logsigmoid(beta * (chosen - rejected))


def hinge(chosen: Tensor, rejected: Tensor, beta: float, **_: Any) -> Tensor:
    """SLiC: relu(1 − β(c − r))  (Zhao et al. 2023)."""
    return torch.relu(1 - beta * (chosen - rejected))


def ipo(chosen: Tensor, rejected: Tensor, beta: float, *, n_chosen: Tensor, n_rejected: Tensor,
        **_: Any) -> Tensor:
    """IPO: (c/|y_w| − r/|y_l| − 1/(2β))²  (Azar et al. 2023, eq. 17; per token, as TRL)."""
    return (_per_token(chosen, rejected, n_chosen, n_rejected) - 1 / (2 * beta)) ** 2


def sigmoid_norm(chosen: Tensor, rejected: Tensor, beta: float, *, n_chosen: Tensor,
                 n_rejected: Tensor, **_: Any) -> Tensor:
    """Length-normalised DPO: −log σ(β(c/|y_w| − r/|y_l|))."""
    return -F.logsigmoid(beta * _per_token(chosen, rejected, n_chosen, n_rejected))


def robust(chosen: Tensor, rejected: Tensor, beta: float, *, label_smoothing: float,
           **_: Any) -> Tensor:
    """rDPO: (−(1−ε) log σ(βΔ) + ε log σ(−βΔ)) / (1 − 2ε), Δ = c − r  (Chowdhury et al. 2024)."""
    z, eps = beta * (chosen - rejected), label_smoothing
    return (-(1 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1 - 2 * eps)


def exo_pair(chosen: Tensor, rejected: Tensor, beta: float, *, label_smoothing: float,
             **_: Any) -> Tensor:
    """EXO: KL(σ(βΔ) ‖ 1 − ε), Δ = c − r  (Ji et al. 2024, eq. 16)."""
    z = beta * (chosen - rejected)
    eps = torch.tensor(label_smoothing, device=z.device, dtype=z.dtype)
    win, lose = torch.sigmoid(z), torch.sigmoid(-z)
    return win * (F.logsigmoid(z) - torch.log1p(-eps)) + lose * (F.logsigmoid(-z) - torch.log(eps))


def nca_pair(chosen: Tensor, rejected: Tensor, beta: float, **_: Any) -> Tensor:
    """NCA: −log σ(βc) − ½ log σ(−βc) − ½ log σ(−βr)  (Chen et al. 2024)."""
    c, r = beta * chosen, beta * rejected
    return -F.logsigmoid(c) - 0.5 * F.logsigmoid(-c) - 0.5 * F.logsigmoid(-r)


def bco_pair(chosen: Tensor, rejected: Tensor, beta: float, **_: Any) -> Tensor:
    """BCO (pairwise, no reward shift): −log σ(βc) − log σ(−βr)  (Jung et al. 2024)."""
    c, r = beta * chosen, beta * rejected
    return -F.logsigmoid(c) - F.logsigmoid(-r)


def sppo_hard(chosen: Tensor, rejected: Tensor, beta: float, **_: Any) -> Tensor:
    """SPPO (hard labels): (c − 1/(2β))² + (r + 1/(2β))²  (Wu et al. 2024)."""
    return (chosen - 0.5 / beta) ** 2 + (rejected + 0.5 / beta) ** 2


def apo_zero(chosen: Tensor, rejected: Tensor, beta: float, **_: Any) -> Tensor:
    """APO-zero: 1 − σ(βc) + σ(βr)  (D'Oosterlinck et al. 2024, eq. 7)."""
    return 1 - torch.sigmoid(beta * chosen) + torch.sigmoid(beta * rejected)


def apo_down(chosen: Tensor, rejected: Tensor, beta: float, **_: Any) -> Tensor:
    """APO-down: σ(βc) + 1 − σ(β(c − r))  (D'Oosterlinck et al. 2024, eq. 8)."""
    return torch.sigmoid(beta * chosen) + 1 - torch.sigmoid(beta * (chosen - rejected))


def discopop(chosen: Tensor, rejected: Tensor, beta: float, *, discopop_tau: float,
             **_: Any) -> Tensor:
    """DiscoPOP: −log σ(βΔ) and exp(−βΔ) blended by σ(βΔ/τ), Δ = c − r  (Lu et al. 2024, eq. 5)."""
    z = beta * (chosen - rejected)
    blend = torch.sigmoid(z / discopop_tau)
    return -F.logsigmoid(z) * (1 - blend) + torch.exp(-z) * blend


def _per_token(chosen: Tensor, rejected: Tensor, n_chosen: Tensor, n_rejected: Tensor) -> Tensor:
    """c/|y_w| − r/|y_l| with the completion lengths (B,), an empty completion counted as 1."""
    return chosen / n_chosen.clamp(min=1) - rejected / n_rejected.clamp(min=1)


# The per-pair losses by TRL loss_type name.
PAIR_LOSSES: dict[str, Callable[..., Tensor]] = {
    "sigmoid": sigmoid, "hinge": hinge, "ipo": ipo, "exo_pair": exo_pair, "nca_pair": nca_pair,
    "robust": robust, "bco_pair": bco_pair, "sppo_hard": sppo_hard, "apo_zero": apo_zero,
    "apo_down": apo_down, "discopop": discopop, "sigmoid_norm": sigmoid_norm,
}
# Loss types whose batch loss is a mean of per-pair terms (or, for "sft", a token mean whose
# denominator is known before the batch runs), so chunking leaves the loss and gradient unchanged.
SUPPORTED_LOSSES = frozenset(PAIR_LOSSES) | {"sft"}


def pair_losses(loss_type: str, beta: float, chosen_logratios: Tensor, rejected_logratios: Tensor,
                n_chosen: Tensor, n_rejected: Tensor, label_smoothing: float = 0.0,
                discopop_tau: float = 0.05) -> Tensor:
    """Per-pair loss terms (B,) of `loss_type` from the log-ratios (B,) and completion lengths (B,).

    "sft" is not per pair (a token mean over the batch): see `sft_loss`.
    """
    loss = PAIR_LOSSES.get(loss_type)
    if loss is None:
        raise ValueError(f"loss_type '{loss_type}' has no per-pair form; use one of "
                         f"{sorted(SUPPORTED_LOSSES)} or engine 'trl'")
    return loss(chosen_logratios, rejected_logratios, beta, n_chosen=n_chosen,
                n_rejected=n_rejected, label_smoothing=label_smoothing, discopop_tau=discopop_tau)


def sft_loss(chosen_logps: Tensor, n_chosen_tokens: int) -> Tensor:
    """SFT term: −Σ log πθ(y_w|x) / (chosen tokens of the whole batch), a () tensor.

    `chosen_logps` (B',) may be a chunk of the batch: the denominator is the batch's, so the chunks'
    terms add up to the batch's.
    """
    return -chosen_logps.sum() / n_chosen_tokens
