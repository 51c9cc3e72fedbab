"""Survival objectives on a network's outputs (tensors only): discrete-time hazards and Cox partial likelihood.

- Discrete time (the MCAT / SurvPath / PORPOISE convention): follow-up is cut into bins at quantiles of the
  training patients' event times; the head predicts one hazard logit per bin, h_k = sigmoid(logit_k) = the
  probability of the event in bin k given survival to it; S_k = prod_{j<=k} (1 - h_j). A patient with an
  event in bin y contributes -log S_{y-1} - log h_y; one censored in bin y contributes -log S_y (survived
  through the bin in which follow-up ended). Risk = -sum_k S_k (higher = earlier event).
- Cox: one log-risk eta per patient; the negative log partial likelihood with Breslow's handling of ties
  (every patient tied at an event time stays in the others' risk sets), averaged over events. Risk = eta.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

LOSSES = ("nll", "cox")


def time_bins(event_times: np.ndarray, n_bins: int) -> np.ndarray:
    """Inner cut points (n_bins - 1,) at quantiles of the event times (uncensored training patients)."""
    times = np.asarray(event_times, np.float64)
    if len(times) == 0:
        raise ValueError("no training patient has an event: the discrete-time bins cannot be placed")
    cuts = np.quantile(times, np.linspace(0, 1, n_bins + 1)[1:-1])
    return np.unique(cuts)


def bin_index(times: Tensor, cuts: Tensor) -> Tensor:
    """Bin of each time: 0 below the first cut, len(cuts) at or above the last. times: (B,) -> (B,) long."""
    return torch.bucketize(times, cuts, right=True)


def discrete_time_nll(logits: Tensor, bins: Tensor, events: Tensor) -> Tensor:
    """Mean negative log-likelihood of discrete-time hazards.

    logits: (B, K) hazard logits; bins: (B,) long bin of each patient's time; events: (B,) 1 = event, 0 = censored.
    """
    logits = logits.float()
    log_h = F.logsigmoid(logits)  # (B, K) log h_k
    log_1mh = F.logsigmoid(-logits)  # (B, K) log (1 - h_k)
    log_s = torch.cumsum(log_1mh, dim=1)  # (B, K) log S_k
    log_s_prev = torch.cat([torch.zeros_like(log_s[:, :1]), log_s[:, :-1]], dim=1)  # (B, K) log S_{k-1}
    y = bins.long().clamp(0, logits.shape[1] - 1)[:, None]  # (B, 1)
    event = events.float()
    uncensored = -(log_s_prev.gather(1, y) + log_h.gather(1, y)).squeeze(1)  # (B,)
    censored = -log_s.gather(1, y).squeeze(1)  # (B,)
    return (event * uncensored + (1 - event) * censored).mean()


def discrete_time_risk(logits: Tensor) -> Tensor:
    """(B, K) hazard logits -> (B,) risk = -sum of the survival curve (higher = earlier event)."""
    survival = torch.cumprod(torch.sigmoid(-logits.float()), dim=1)  # (B, K) S_k
    return -survival.sum(dim=1)


def cox_nll(eta: Tensor, times: Tensor, events: Tensor) -> Tensor:
    """Negative log partial likelihood (Breslow ties), averaged over the batch's events; 0 without events.

    eta: (B,) log-risk; times: (B,) follow-up; events: (B,) 1 = event, 0 = censored.
    """
    eta = eta.float()
    at_risk = times[None, :] >= times[:, None]  # (B, B): row i's risk set, every j still followed at t_i
    log_denominator = torch.logsumexp(eta[None, :].masked_fill(~at_risk, float("-inf")), dim=1)  # (B,)
    event = events.float()
    n_events = event.sum()
    if n_events == 0:
        return eta.sum() * 0.0
    return -((eta - log_denominator) * event).sum() / n_events
