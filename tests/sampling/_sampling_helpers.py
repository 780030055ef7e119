"""Helpers of the sampling tests: run a call through the kernel and the reference, statistics."""

import os

import torch


def both(fn, *args, **kwargs):
    """fn through the Triton kernel (interpreter on CPU) and through the reference."""
    old = os.environ.get("MOECOMM_BACKEND")
    try:
        os.environ["MOECOMM_BACKEND"] = "triton"
        a = fn(*args, **kwargs)
        os.environ["MOECOMM_BACKEND"] = "reference"
        b = fn(*args, **kwargs)
    finally:
        if old is None:
            os.environ.pop("MOECOMM_BACKEND", None)
        else:
            os.environ["MOECOMM_BACKEND"] = old
    return a, b


def chi_square_pvalue(counts: torch.Tensor, expected_probs: torch.Tensor) -> tuple[float, float]:
    """(chi-square statistic, p-value) of observed counts against expected probabilities, over
    the bins with positive expectation (df = bins - 1). The p-value is the regularised upper
    incomplete gamma function Q(df / 2, chi2 / 2)."""
    n = counts.sum().double()
    mask = expected_probs > 0
    exp = expected_probs[mask].double() * n
    obs = counts[mask].double()
    chi2 = ((obs - exp) ** 2 / exp).sum()
    df = int(mask.sum()) - 1
    p = torch.special.gammaincc(torch.tensor(df / 2.0, dtype=torch.float64), chi2 / 2.0)
    return float(chi2), float(p)
