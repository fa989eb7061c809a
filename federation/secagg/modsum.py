"""A running sum of residue vectors modulo 2^k, on the CPU or a GPU.

Two interchangeable back ends give bit-identical results:

- ``"cpu"``: numpy uint64, whose arithmetic wraps modulo 2^64 by definition;
  since 2^k divides 2^64, one reduction at the end suffices. numpy runs
  element-wise operations on one thread, which keeps the time predictable on
  a shared host (torch's CPU thread pool was measured 500x slower for a
  100k-entry add on a loaded 2-core machine).
- ``"cuda"`` and ``"torch-cpu"``: torch int64. int64 overflow is undefined in
  the kernels, so it is avoided instead of relied on: terms are reduced below
  2^k (k <= 62) and the accumulator is reduced every 2^(63-k) - 1 terms, the
  most an int64 absorbs without overflow.
"""

from __future__ import annotations

import numpy as np

DEVICES = ("cpu", "torch-cpu", "cuda")


def resolve_device(device: str) -> str:
    """Maps "auto" to "cuda" when torch sees a GPU, else "cpu"; checks the rest."""
    if device == "cpu":
        return device
    # torch is imported only off the numpy path: a hospital agent that masks
    # on "cpu" then stays free of torch's import time and memory.
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device not in DEVICES:
        raise ValueError(f"device must be 'auto' or one of {DEVICES}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch sees no CUDA device")
    return device


class ModularSum:
    """Sum of uint64 residue vectors modulo 2^modulus_bits.

    length: entries per vector.
    modulus_bits: k in [2, 62].
    device: "cpu" (numpy), "torch-cpu" or "cuda" (torch).
    """

    def __init__(self, length: int, modulus_bits: int, device: str) -> None:
        if not 2 <= modulus_bits <= 62:
            raise ValueError(f"modulus_bits must lie in [2, 62], got {modulus_bits}")
        self.length = length
        self.modulus_bits = modulus_bits
        self.device = resolve_device(device)
        self._mask = (1 << modulus_bits) - 1
        self._headroom = 2 ** (63 - modulus_bits) - 1
        self._pending = 0
        if self.device == "cpu":
            self._total = np.zeros(length, dtype=np.uint64)
        else:
            import torch

            torch_device = "cpu" if self.device == "torch-cpu" else self.device
            self._total = torch.zeros(length, dtype=torch.int64, device=torch_device)

    def add(self, residues: np.ndarray, sign: int = 1, reduced: bool = False) -> None:
        """Adds (sign +1) or subtracts (sign -1) a uint64 vector mod 2^k.

        reduced: True when the caller guarantees every entry is below 2^k;
            otherwise the torch back end reduces the vector first (an
            untrusted input).
        The array may be reused by the caller once this returns.
        """
        if residues.shape != (self.length,) or residues.dtype != np.uint64:
            raise ValueError(
                f"expected {self.length} uint64 residues, got shape {residues.shape} "
                f"and dtype {residues.dtype}"
            )
        if self.device == "cpu":
            if sign > 0:
                np.add(self._total, residues, out=self._total)
            else:
                np.subtract(self._total, residues, out=self._total)
            return

        import torch

        term = torch.from_numpy(residues.view(np.int64)).to(self._total.device)
        if not reduced:
            term = torch.bitwise_and(term, self._mask)
        if self._pending == self._headroom:
            self._total.bitwise_and_(self._mask)
            self._pending = 0
        if sign > 0:
            self._total.add_(term)
        else:
            self._total.sub_(term)
        self._pending += 1

    def signed(self) -> np.ndarray:
        """Returns the sum as int64 in [-2^(k-1), 2^(k-1)) on the CPU."""
        half = 1 << (self.modulus_bits - 1)
        if self.device == "cpu":
            total = (self._total & np.uint64(self._mask)).view(np.int64)
            return np.where(total >= half, total - (1 << self.modulus_bits), total)

        import torch

        # AND with a non-negative mask maps two's complement values into [0, 2^k).
        total = torch.bitwise_and(self._total, self._mask)
        total = torch.where(total >= half, total - (1 << self.modulus_bits), total)
        return total.cpu().numpy()
