"""The parity harness every backend test uses (it lives in fastres.parity, shared with
`fastres check`).

A Case describes one call of the fused op. `check_parity(case, backend, dtype, device)`
runs it on a backend (outputs poisoned with NaN first), runs the reference in float64 on
the same already-rounded inputs, and asserts the relative error ||a - b|| / ||b|| of the
output, every gradient and the running statistics is under the SPEC.md bound.
"""
from fastres.parity import (  # noqa: F401 - re-exported for the tests
    TF32_TOLERANCE,
    TOLERANCE,
    Case,
    check_parity,
    make_inputs,
    parity_errors,
    rel_err,
    run_backend,
    run_reference,
)
