"""damped_cholesky: block-symmetrized lower triangle, factored in one working copy or in place
(the memory of if_exact on the default run)."""

from __future__ import annotations

import pytest
import torch

from estimators.influence import damped_cholesky


def _matrix(d: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, dtype=torch.float64, generator=g)
    return a @ a.T / d + 1e-3 * torch.randn(d, d, dtype=torch.float64, generator=g)  # asymmetric


@pytest.mark.parametrize("d", [3, 600])  # 600: three blocks of the symmetrization
def test_matches_the_factor_of_the_symmetrized_matrix(d: int) -> None:
    h = _matrix(d)
    expected = torch.linalg.cholesky((h + h.T) / 2 + 0.1 * torch.eye(d, dtype=torch.float64))
    kept = h.clone()
    torch.testing.assert_close(damped_cholesky(h, 0.1), expected)
    torch.testing.assert_close(h, kept)  # not overwritten by default
    factor = damped_cholesky(h, 0.1, overwrite=True)
    assert factor.data_ptr() == h.data_ptr()  # no d x d copy
    torch.testing.assert_close(factor, expected)


def test_float32_input_is_copied_even_with_overwrite() -> None:
    h = _matrix(40).float()
    factor = damped_cholesky(h, 0.1, overwrite=True)
    assert factor.dtype == torch.float64 and factor.data_ptr() != h.data_ptr()


def test_indefinite_in_place_names_the_minor() -> None:
    h = torch.diag(torch.tensor([2.0, 1.0, -0.5], dtype=torch.float64))
    with pytest.raises(ValueError, match="leading minor of order 3 is not positive"):
        damped_cholesky(h, 0.1, overwrite=True)
