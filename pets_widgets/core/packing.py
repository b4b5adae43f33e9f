"""Slot packing: many integer cells in one Paillier plaintext, overflow impossible by
construction.

Cells share one plaintext in fixed-width slots; the width is chosen from the number of
sites and the largest possible cell value so that the sum over all sites cannot carry
from one slot into the next, and every site checks its own values against the bound
before encrypting.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from pets_widgets.core.errors import IntegrityError, PackingError

#: Largest number of patients one site may hold; public, part of the packing parameters.
DEFAULT_SITE_CAPACITY = 2**22


def capacity_for(n_rows: int) -> int:
    """A public packing bound for a site of ``n_rows`` patients: ``n_rows`` rounded up to
    two significant figures, and at least to the next hundred (never finer than the nearest
    hundred a status display shows).

    The bound sets the slot width, so a tight one packs more cells into each ciphertext:
    2 sites of 100,000 patients need 18-bit slots, against 24 bits for the default bound.
    """
    step = max(100, 10 ** (len(str(max(n_rows, 1))) - 2))
    return max(step, -(-n_rows // step) * step)


# --------------------------------------------------------------------------- packing
@dataclass(frozen=True)
class Packing:
    """Fixed-width slots: ``slots`` cells of ``slot_bits`` bits in each Paillier plaintext.

    ``cell_bound`` is the largest value one site may put in a cell; ``slot_bits`` holds
    ``n_sites * cell_bound`` so the homomorphic sum over all sites never overflows a slot.
    """

    n_cells: int
    n_sites: int
    cell_bound: int
    key_bits: int
    slot_bits: int = field(init=False)
    slots: int = field(init=False)

    def __post_init__(self) -> None:
        if self.n_cells < 1 or self.n_sites < 1 or self.cell_bound < 1:
            raise PackingError("packing needs at least one cell, one site and a positive bound")
        slot_bits = (self.n_sites * self.cell_bound).bit_length()
        # Plaintexts stay below 2**(key_bits - 1) < n, whatever the exact modulus.
        slots = (self.key_bits - 1) // slot_bits
        if slots < 1:
            raise PackingError(f"a {slot_bits}-bit slot does not fit a {self.key_bits}-bit key")
        object.__setattr__(self, "slot_bits", slot_bits)
        object.__setattr__(self, "slots", slots)

    @classmethod
    def for_layout(cls, n_cells: int, max_contribution: int, n_sites: int, key_bits: int,
                   site_capacity: int = DEFAULT_SITE_CAPACITY) -> Packing:
        """Packing for a query whose cells grow by at most ``max_contribution`` per patient."""
        return cls(n_cells, n_sites, site_capacity * max_contribution, key_bits)

    @property
    def n_ciphertexts(self) -> int:
        return math.ceil(self.n_cells / self.slots)

    def pack(self, values: Sequence[int]) -> list[int]:
        """Plaintexts holding ``values`` (each in ``[0, cell_bound]``), first cell lowest."""
        if len(values) != self.n_cells:
            raise PackingError(f"expected {self.n_cells} cells, got {len(values)}")
        bound = self.cell_bound
        out = []
        for start in range(0, self.n_cells, self.slots):
            m = 0
            for value in reversed(values[start:start + self.slots]):
                v = int(value)
                if not 0 <= v <= bound:
                    # Never echo the value: it is per-site plaintext.
                    raise PackingError(
                        f"a cell is outside the agreed range 0-{bound}; the site holds more "
                        f"patients than its declared capacity or the layout is wrong"
                    )
                m = (m << self.slot_bits) | v
            out.append(m)
        return out

    def unpack(self, plaintexts: Sequence[int]) -> list[int]:
        """Cell values from summed plaintexts (the inverse of :meth:`pack` on sums)."""
        if len(plaintexts) != self.n_ciphertexts:
            raise PackingError(f"expected {self.n_ciphertexts} plaintexts, got {len(plaintexts)}")
        mask = (1 << self.slot_bits) - 1
        most = self.n_sites * self.cell_bound  # the largest total honest sites can produce
        out: list[int] = []
        for i, m in enumerate(plaintexts):
            count = min(self.slots, self.n_cells - i * self.slots)
            m = int(m)
            if m >> (count * self.slot_bits):
                raise IntegrityError("a decrypted total has bits beyond its slots: a site "
                                     "encrypted values outside the agreed range")
            for _ in range(count):
                value = m & mask
                if value > most:
                    raise IntegrityError("a decrypted total exceeds what honest sites can "
                                         "produce: a site encrypted values outside the range")
                out.append(value)
                m >>= self.slot_bits
        return out

    def to_dict(self) -> dict[str, int]:
        return {"n_cells": self.n_cells, "n_sites": self.n_sites,
                "cell_bound": self.cell_bound, "key_bits": self.key_bits}
