"""Test helpers shared by the suite (and usable by anyone checking a kernel).

The rule (STYLE.md): compare against a float64 reference; a kernel's error may be at most
about twice the error of the same computation done by torch in the same dtype.
"""

from __future__ import annotations

import torch


def max_abs_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    return (actual.double() - reference.double()).abs().max().item() if reference.numel() else 0.0


def assert_close_to_reference(actual: torch.Tensor, reference: torch.Tensor,
                              baseline: torch.Tensor | None = None, factor: float = 2.0,
                              reduction: int = 1, name: str = "output") -> None:
    """actual: the kernel's result; reference: float64 truth; baseline: torch's own result in
    actual's dtype. Passes when err(actual) <= factor * max(err(baseline), floor), where
    floor = eps * scale * sqrt(reduction) is the rounding a `reduction`-term sum may carry
    (it matters when actual is float64 itself, so no baseline can show torch's error)."""
    assert actual.shape == reference.shape, f"{name}: shape {actual.shape} != {reference.shape}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    scale = max(reference.abs().max().item() if reference.numel() else 0.0, 1.0)
    eps = torch.finfo(actual.dtype).eps if actual.is_floating_point() else 0.0
    allowed = eps * scale * max(1.0, float(reduction)) ** 0.5
    if baseline is not None:
        allowed = max(allowed, max_abs_err(baseline, reference))
    err = max_abs_err(actual, reference)
    assert err <= factor * allowed, (
        f"{name}: max abs error {err:.3e} exceeds {factor} x {allowed:.3e} "
        f"(torch's own error in {actual.dtype}, or eps x scale)")


def off_the_kink(draw, pre_activation, reduction: int, tries: int = 100) -> torch.Tensor:
    """draw() until every non-zero element of pre_activation(x) (computed in float64) lies
    farther from 0 than float32 may round a `reduction`-term sum. ReLU's derivative jumps at 0,
    so a pre-activation within rounding of 0 may take the other branch in float32 than in the
    reference: an O(1) difference in the gradient that says nothing about the kernel. Exact
    zeros (units with no stored blocks and no bias) take the same branch in both.

    pre_activation must work row by row (each row of x's last dimension gives its own row of
    the result, as a Linear does): only the rows that come near the kink are drawn again, so
    the chance of success does not shrink with the number of rows (thousands of units per
    draw put some unit near 0 in most whole draws)."""
    margin = 32 * torch.finfo(torch.float32).eps * max(1.0, float(reduction)) ** 0.5
    first = draw()
    x = first.detach()
    for _ in range(tries):
        h = pre_activation(x.double()).abs()
        scale = max(h.max().item() if h.numel() else 0.0, 1.0)
        near = ((h > 0) & (h < margin * scale)).any(dim=-1, keepdim=True)
        if not near.any():
            return x.requires_grad_(first.requires_grad)
        x = torch.where(near, draw().detach(), x)
    raise AssertionError(f"no {tries} draws kept each row's pre-activations {margin:.1e} from 0")


def random_block_mask(grid, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool block mask with exactly round(density * n) True entries at random places."""
    n = grid[0] * grid[1]
    keep = round(density * n)
    flat = torch.zeros(n, dtype=torch.bool)
    flat[torch.randperm(n, generator=generator)[:keep]] = True
    return flat.view(*grid)
