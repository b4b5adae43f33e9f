"""A registry site: holds its rows and answers approved query specs with encrypted aggregates.

Rows never leave a :class:`Site`; neither does the plaintext aggregate. What leaves is an
:class:`~pets_widgets.core.wire.EncryptedAggregate`, encrypted to a key whose enclave passed
attestation, and signed with the site's own key.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from fractions import Fraction
from typing import Any

import jwt
import numpy as np
import pandas as pd

from pets_widgets.core import schema as S
from pets_widgets.core.errors import AttestationError, QueryValidationError, SiteRefusal
from pets_widgets.core.evidence import TOKEN_SECONDS
from pets_widgets.core.packing import DEFAULT_SITE_CAPACITY, Packing
from pets_widgets.core.paillier import (
    ObfuscatorPool,
    PublicKey,
    encrypt,
    foreground,
    key_fingerprint,
)
from pets_widgets.core.query import Block, Dim, Layout, QuerySpec, spec_from_dict
from pets_widgets.core.signing import SigningKey
from pets_widgets.core.wire import AggregateRequest, EncryptedAggregate, new_nonce
from pets_widgets.site.budget import SiteBudget
from pets_widgets.site.trust import Floors, SiteTrust, verify_token


class Site:
    """One registry: rows, population denominators, a signing key and an enrollment.

    ``signing_key`` defaults to a fresh Ed25519 key.

    The public surface exposes no rows and no plaintext aggregate: only the site's name,
    its verify key, a rounded size, its public denominators and :meth:`respond`.
    """

    def __init__(self, name: str, rows: pd.DataFrame, schema: S.Schema,
                 population: pd.DataFrame | None = None,
                 capacity: int = DEFAULT_SITE_CAPACITY,
                 signing_key: SigningKey | None = None, floors: Floors | None = None,
                 budget: SiteBudget | None = None):
        if name not in schema.sites:
            raise ValueError(f"site {name!r} is not in the federation's schema {schema.sites}")
        missing = [c for c in schema.names if c not in rows.columns]
        if missing:
            raise QueryValidationError("rows", f"missing columns {missing}", schema.names)
        if len(rows) > capacity:
            raise ValueError(f"site {name!r} holds more patients than its capacity {capacity}")
        self.name = name
        self.schema = schema
        self.capacity = capacity
        self._rows = rows.reset_index(drop=True)
        self._codes: dict[str, np.ndarray] = {}
        self._indices: dict[tuple[Dim, ...], np.ndarray] = {}
        self._indices_lock = threading.Lock()  # concurrent queries may share a site
        self._population = population
        # A site's long-term identity; a fresh one unless the site keeps it (e.g. a key file
        # read inside a site kernel, so a restarted kernel signs with the registered key).
        self._signing_key = signing_key or SigningKey()
        self.verify_key = self._signing_key.public
        self._trust: SiteTrust | None = None
        #: This site's own floors and limits (from its configuration, never a request).
        self.floors = floors or Floors()
        self.budget = budget or SiteBudget(None, self.floors.lifetime_epsilon)
        self._challenges: dict[str, float] = {}  # nonce -> expiry, oldest first
        self._nonce_lock = threading.Lock()
        self._pools: dict[int, ObfuscatorPool] = {}
        self.precompute = True

    def __repr__(self) -> str:
        return f"Site({self.name!r}, about {self.rows_rounded} patients)"

    # -- public facts ----------------------------------------------------------------------
    @property
    def rows_rounded(self) -> int:
        """Number of patients rounded to the nearest 100 (for status displays)."""
        return int(round(len(self._rows), -2))

    @property
    def population(self) -> pd.DataFrame | None:
        """Public person-years denominators (not patient data), or None."""
        return None if self._population is None else self._population.copy()

    def enroll(self, trust: SiteTrust) -> None:
        """Trust this platform verifier (pinned JWKS and issuer) and these enclave images."""
        self._trust = trust

    def challenge(self) -> str:
        """A fresh nonce the enclave's token must answer before this site encrypts anything."""
        return self.next_nonce()[0]

    def nonce_open(self, nonce: str) -> bool:
        """Whether ``nonce`` is outstanding (issued, unused, unexpired)."""
        with self._nonce_lock:
            expires = self._challenges.get(nonce)
        return expires is not None and expires > time.time()

    def next_nonce(self) -> tuple[str, float]:
        """A fresh nonce and the time (seconds since the epoch) it expires.

        At most :data:`OPEN_NONCES` are outstanding (the oldest go first), each for
        :data:`~pets_widgets.core.evidence.TOKEN_SECONDS`: a caller asking again and again
        cannot grow the site's memory.
        """
        nonce, expires = new_nonce(), time.time() + TOKEN_SECONDS
        with self._nonce_lock:
            self._challenges[nonce] = expires
            while len(self._challenges) > OPEN_NONCES:
                self._challenges.pop(next(iter(self._challenges)))
        return nonce, expires

    # -- the one way out -------------------------------------------------------------------
    def respond(self, request: AggregateRequest) -> EncryptedAggregate:
        """Verify the quote, run the spec on this site's rows, pack, encrypt and sign.

        Raises :class:`AttestationError` before touching any data when the enclave is not
        the approved one, and :class:`QueryValidationError` for a spec this site rejects.
        """
        with foreground():
            return self._respond(request)

    def _respond(self, request: AggregateRequest) -> EncryptedAggregate:
        """The site's checks, in order: the token (signature, audience, time, nonce, key
        binding, debug, image, dictionary, floors), the spec against its own dictionary and
        the token's admission, site breakdowns, the encoding it computes itself, its own
        budget. Only then does it read its rows."""
        if self._trust is None:
            raise AttestationError(f"site {self.name!r} trusts no verifier yet", "trust.config")
        nonce = self._current_nonce(request.token)
        verified = verify_token(request.token, site=self.name, nonce=nonce,
                                public_key_n=request.public_key.n, trust=self._trust,
                                floors=self.floors, dictionary=self.schema.digest)
        admission = verified.admission
        spec = spec_from_dict(request.spec.to_dict()).validate(self.schema)
        layout = spec.layout(self.schema)
        if (spec.hash != admission.spec_hash or self.name not in admission.sites
                or layout.size != admission.layout_size):
            raise AttestationError("the enclave's attestation token fails check "
                                   "trust.admission: it admits another query", "trust.admission")
        if not self.floors.allow_site_breakdown and _breaks_down_by_site(spec):
            raise SiteRefusal("floor.site_breakdown", "this site does not let its numbers be "
                              "shown on their own (grouping or filtering by site)")
        packing = request.packing
        if packing != self._packing(layout, len(admission.sites), request.public_key):
            # One message for every difference: a forged bound or width must not turn the
            # packing check into a question about this site's values.
            raise SiteRefusal("encoding", "the request's encoding does not match this site's")
        self.budget.charge(admission.id, Fraction(admission.epsilon))
        values = self._aggregate(spec)
        plaintexts = packing.pack(values.tolist())
        ciphertexts = encrypt(request.public_key, plaintexts,
                              self._pool(request.public_key, len(plaintexts)))
        aggregate = EncryptedAggregate(
            self.name, spec.hash, nonce, key_fingerprint(request.public_key), packing,
            tuple(ciphertexts), admission=admission.id)
        return aggregate.signed(self._signing_key)

    def _current_nonce(self, token: str) -> str:
        """The challenge this token answers, taken for good (each nonce answers once)."""
        try:
            claims = jwt.decode(token, options={"verify_signature": False})
        except jwt.InvalidTokenError:
            raise AttestationError("the enclave's attestation token fails check trust.format:"
                                   " it is not a token this site can read", "trust.format") \
                from None
        try:
            claimed = claims["eat_nonce"][0]
        except (KeyError, IndexError, TypeError):
            raise AttestationError("the enclave's attestation token fails check trust.claims:"
                                   " a required claim is missing", "trust.claims") from None
        with self._nonce_lock:
            # one use only, whatever the rest of the checks say
            expires = self._challenges.pop(claimed, None) if isinstance(claimed, str) else None
        if expires is None or expires < time.time():
            raise AttestationError("the enclave's attestation token fails check trust.nonce: "
                                   "it answers no current challenge of this site",
                                   "trust.nonce")
        return claimed

    def _packing(self, layout: Layout, n_sites: int, public_key: PublicKey) -> Packing:
        """The encoding this site computes itself: its own capacity, the admission's number
        of sites and the size of the key it encrypts to."""
        return Packing.for_layout(layout.size, layout.max_contribution, n_sites,
                                  public_key.n.bit_length(), self.capacity)

    def _pool(self, public_key: PublicKey, used: int) -> ObfuscatorPool | None:
        """This site's pool of precomputed obfuscators for an attested enclave key: started
        at the first query to that key (which is encrypted cold) and kept about twice as
        full as the largest query so far."""
        if not self.precompute:
            return None
        pool = self._pools.get(public_key.n)
        if pool is None:
            pool = self._pools[public_key.n] = ObfuscatorPool(public_key, target=0)
        pool.target = max(pool.target, 2 * used)
        return pool

    def close(self) -> None:
        """Stop background precomputation."""
        for pool in self._pools.values():
            pool.close()

    # -- computation (private: per-site plaintext) ------------------------------------------
    def _aggregate(self, spec: QuerySpec) -> np.ndarray:
        """The integer aggregate vector of ``spec`` on this site's rows, in layout order."""
        layout = spec.layout(self.schema)
        mask = self._mask(spec.where)
        parts = []
        for block in layout.blocks:
            part = np.asarray(_count_or_sum(self, block, mask), dtype=np.int64)
            if part.shape != (block.size,):
                raise AssertionError(f"block {block.name} has {part.shape}, not {block.size}")
            parts.append(part)
        return np.concatenate(parts)

    def _column_codes(self, name: str) -> np.ndarray:
        """Integer codes of a categorical or boolean column in schema order (cached)."""
        if name not in self._codes:
            var = self.schema[name]
            col = self._rows[name]
            if var.kind is S.Kind.BOOLEAN:
                codes = col.to_numpy(dtype=bool).astype(np.int64)
            else:
                codes = pd.Categorical(col, categories=var.categories).codes.astype(np.int64)
                if (codes < 0).any():
                    raise QueryValidationError(name, "holds values outside the schema",
                                               var.categories)
            self._codes[name] = codes
        return self._codes[name]

    def _dim_codes(self, dim: Dim) -> np.ndarray:
        if dim.coding == "bins":
            x = self._rows[dim.name].to_numpy(dtype=np.int64)
            return np.searchsorted(np.asarray(dim.edges), x, side="right") - 1
        return self._column_codes(dim.name)

    def _cell_index(self, dims: tuple[Dim, ...]) -> np.ndarray:
        """Each row's cell in the grid of ``dims``. Layouts are fixed by specs, so a few are
        asked again and again (the dashboard's presets): the latest ones are kept."""
        index = self._indices.get(dims)
        if index is None:
            if not dims:
                index = np.zeros(len(self._rows), dtype=np.int64)
            else:
                codes = [self._dim_codes(d) for d in dims]
                index = np.ravel_multi_index(codes, tuple(d.size for d in dims))
            with self._indices_lock:
                while len(self._indices) >= _KEPT_INDICES:
                    self._indices.pop(next(iter(self._indices)))
                self._indices[dims] = index
        return index

    def _mask(self, where: Mapping[str, tuple[Any, ...]]) -> np.ndarray:
        mask = np.ones(len(self._rows), dtype=bool)
        for name, values in where.items():
            var = self.schema[name]
            if var.kind is S.Kind.INTEGER:
                x = self._rows[name].to_numpy(dtype=np.int64)
                mask &= (x >= values[0]) & (x <= values[1])
            else:
                wanted = [var.values.index(v) for v in values if v in var.values]
                mask &= np.isin(self._column_codes(name), wanted)
        return mask

    def _summand(self, block: Block) -> np.ndarray:
        assert block.summand is not None
        var = self.schema[block.summand]
        x = self._rows[block.summand].to_numpy()
        lo, hi = var.clip if var.clip is not None else (0, 1)
        return np.clip(x.astype(np.int64), lo, hi) - block.offset


def _count_or_sum(site: Site, block: Block, mask: np.ndarray) -> np.ndarray:
    """Counts (or clipped sums) of the masked rows in every cell of the block: one pass."""
    idx = site._cell_index(block.dims)[mask]
    if block.summand is None:
        return np.bincount(idx, minlength=block.size)
    weights = site._summand(block)[mask].astype(np.float64)  # exact: integers below 2**53
    return np.rint(np.bincount(idx, weights=weights, minlength=block.size)).astype(np.int64)


#: How many nonces a site keeps outstanding at once (enough for many concurrent queries).
OPEN_NONCES = 256
#: How many cell indices (one integer per row each) a site keeps for repeated layouts.
_KEPT_INDICES = 8



def _breaks_down_by_site(spec: QuerySpec) -> bool:
    """Whether a spec shows numbers by site: grouped, cross-tabulated, stratified or filtered
    on ``site`` (a filter keeping every site is dropped by the canonical form first)."""
    if "site" in spec.where:
        return True
    for name in ("by", "rows", "cols"):
        value = getattr(spec, name, ())
        if value == "site" or (isinstance(value, tuple) and "site" in value):
            return True
    return False
