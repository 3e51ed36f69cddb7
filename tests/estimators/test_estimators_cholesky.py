"""damped_cholesky: block-symmetrized lower triangle, factored in one working copy or in place
(the memory of if_exact on the default run)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def test_in_place_factor_of_a_row_major_matrix_needs_no_second_matrix() -> None:
    """LAPACK copies a row-major matrix to column-major before factoring it; the transposed
    view avoids that d x d copy (176 MiB at the default run's d = 4,810)."""
    script = """
import torch
from estimators.influence import damped_cholesky

def kib(field):
    return next(int(x.split()[1]) for x in open("/proc/self/status") if x.startswith(field))

d = 3000
h = torch.zeros(d, d, dtype=torch.float64)
g = torch.randn(d, 400, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
h.addmm_(g, g.T)
del g
damped_cholesky(torch.eye(300, dtype=torch.float64), 1.0)  # LAPACK's own buffers, once
open("/proc/self/clear_refs", "w").write("5")  # the peak (VmHWM) restarts from VmRSS
before = kib("VmRSS")
damped_cholesky(h, 1.0, overwrite=True)
print((kib("VmHWM") - before) / 1024)  # MiB
"""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    grew_mib = float(out.stdout.split()[-1])
    assert grew_mib < 40, f"peak RSS grew {grew_mib:.0f} MiB (a 3000 x 3000 copy is 69 MiB)"
