"""Rule 7 of the verdict: how far an adapter lies along the direction in which the others differ most.

Divide-and-Conquer (Shejwalkar and Houmansadr, NDSS 2021) scores each client by its squared
projection on the leading principal direction of the centred updates: several attackers
that push the same way (clients sharing a backdoor trigger, a coordinated group with
non-identical updates) make their common deviation the direction in which the pool varies
most, even when each of them alone looks like an honest client. DnC subsamples coordinates
and fits the direction with the scored client in it. Here it is exact and leave-one-out:

    s_k = <Theta_k - mu, u>^2 / (lambda / n)

where ``mu`` is the mean of the ``n`` other adapters' whole updates (every module), ``u`` the
leading principal direction of their centred updates and ``lambda / n`` their mean square
along it, so an honest adapter scores about as the others do. Everything comes from the
``K x K`` Gram matrix of the whole updates: ``u`` is a combination of the others' centred
updates, and no vector of the model's width is formed.

Under honesty the projection is roughly Gaussian, so ``s_k`` is a scaled chi-square with one
degree of freedom; :func:`clair_cli.core.calibration.critical_value` with ``law="log_chi2"``
calibrates ``log s_k`` against the others' values for that law.
"""

from __future__ import annotations

import math

import torch

LOO_MAX = 128  # above: one direction per call, fitted on every adapter that may shape it
CHUNK = 32  # leave-one-out fits solved together (CHUNK K x K matrices)


def leading_direction_scores(
    inner: torch.Tensor, shapes: torch.Tensor, leave_out: list[list[int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per adapter, ``s_k`` (module docstring) and the share of its own deviation that lies
    along ``u``, ``<Theta_k - mu, u>^2 / ||Theta_k - mu||^2``; NaN where fewer than 3 others
    shape its fit or they do not vary.

    ``s_k`` grows with the adapter's whole deviation from the others; the share does not (an
    honest client with a larger alpha deviates more in every direction, a coordinated one
    mostly along ``u``).

    Args:
        inner: ``K x K`` Gram matrix of the whole updates, ``sum_m <Theta_jm, Theta_km>``.
        shapes: which adapters may shape the centre and the direction (not flagged, not a
            copy; the references in a gate).
        leave_out: per adapter, the adapters left out of its fit with it (itself and its copies).

    Above ``LOO_MAX`` adapters, one direction is fitted on every adapter in ``shapes`` and
    each adapter's weight in it is at most ``1 / LOO_MAX``; the scores are then in-sample.
    """
    G = inner.double()
    K = G.shape[0]
    out = torch.full((K,), math.nan, dtype=torch.float64)
    shares = torch.full((K,), math.nan, dtype=torch.float64)
    if K > LOO_MAX:
        masks = shapes.double()[None, :]
        rows = [list(range(K))]
    else:
        masks = shapes.double()[None, :].repeat(K, 1)
        for k, group in enumerate(leave_out):
            masks[k, group] = 0.0
        rows = [[k] for k in range(K)]
    for start in range(0, masks.shape[0], CHUNK):
        m = masks[start : start + CHUNK]  # (c, K)
        n = m.sum(1)  # (c,)
        mean_row = (m @ G) / n.clamp_min(1)[:, None]  # <mu, Theta_j> for every j
        centre_sq = (mean_row * m).sum(1) / n.clamp_min(1)  # ||mu||^2
        # H G H with H = diag(m) - m m^T / n, the centring on each fit's members, in O(K^2):
        # <Theta_i - mu, Theta_j - mu> on the members, zero elsewhere.
        centred = (m[:, :, None] * m[:, None, :]) * (
            G[None] - mean_row[:, :, None] - mean_row[:, None, :] + centre_sq[:, None, None]
        )
        evals, evecs = torch.linalg.eigh(centred)
        lead, v = evals[:, -1], evecs[:, :, -1]  # v is zero off the members
        scale = torch.diagonal(centred, dim1=1, dim2=2).sum(1)  # the members' total centred variance
        ok = (n >= 3) & (lead > 1e-12 * scale.clamp_min(0)) & (lead > 0)
        for pos, members in enumerate(rows[start : start + CHUNK] if K <= LOO_MAX else rows):
            if not bool(ok[pos]):
                continue
            # <Theta_k - mu, u> with the unit direction u = sum_j v_j Theta_j / sqrt(lead).
            proj = (G[members] - mean_row[pos]) @ v[pos] / lead[pos].sqrt()
            out[members] = proj**2 * n[pos] / lead[pos]
            dev_sq = torch.diagonal(G)[members] - 2 * mean_row[pos][members] + centre_sq[pos]  # ||Theta_k - mu||^2
            shares[members] = (proj**2 / dev_sq.clamp_min(1e-300)).clamp(max=1.0)
    return out, shares
