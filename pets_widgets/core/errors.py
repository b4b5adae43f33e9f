"""Exception classes: each names the rule or field a researcher can act on.

Messages state rules and parameters, never a hidden value: a refusal says which policy
floor was hit, not the size of the subset that hit it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class PetsError(Exception):
    """Base class of every error pets_widgets raises on purpose."""


class QueryValidationError(PetsError, ValueError):
    """A query, or a run parameter, is not valid against the schema or the allowed ranges.

    ``field`` names the offending field (``"by"``, ``"where.sex"``, ``"epsilon"``) and
    ``allowed`` lists or describes what would have been accepted.
    """

    def __init__(self, field: str, problem: str, allowed: Iterable[object] | str | None = None):
        self.field = field
        self.problem = problem
        if allowed is None or isinstance(allowed, str):
            self.allowed: tuple[object, ...] | str | None = allowed
            shown = allowed
        else:
            self.allowed = tuple(allowed)
            shown = ", ".join(repr(a) for a in self.allowed)
        message = f"{field}: {problem}"
        if shown:
            message += f"; allowed: {shown}"
        super().__init__(message)


class QueryRefused(PetsError):
    """The enclave refused to release: a policy rule would be broken. ``rule`` names it."""

    def __init__(self, rule: str, message: str):
        self.rule = rule
        super().__init__(message)


class BudgetExceeded(QueryRefused):
    """The query's epsilon would take an analyst or the federation past its total budget."""


class AttestationError(PetsError):
    """A site refused the enclave: its attestation token failed a check. ``rule`` names the
    check (``trust.signature``, ``trust.image``, ``floor.k``...), never a value."""

    def __init__(self, message: str = "", rule: str = "trust"):
        self.rule = rule
        super().__init__(message)


class SiteRefusal(PetsError):
    """A site refused a request by one of its own rules (``rule``: ``floor.site_breakdown``,
    ``lifetime_epsilon``, ``encoding``...). The message names the rule, never a value."""

    def __init__(self, rule: str, message: str):
        self.rule = rule
        super().__init__(f"{message} (rule {rule})")


class IntegrityError(PetsError):
    """An encrypted aggregate was tampered with, is for another spec or key, or is unsigned."""


class PackingError(PetsError, ValueError):
    """An aggregate does not fit the slot layout agreed for the query (overflow by construction)."""


class SiteError(PetsError):
    """A site failed during a query; ``site`` names it and ``cause`` says how."""

    def __init__(self, site: str, cause: str, rule: str = ""):
        super().__init__(f"site {site!r} failed: {cause}")
        # After the base classes' __init__ (AttestationError sets a default rule of its own).
        self.site = site
        self.cause = cause
        self.rule = rule


class SiteAttestationError(SiteError, AttestationError):
    """A site refused to encrypt because the enclave's attestation did not verify."""


class SiteIntegrityError(SiteError, IntegrityError):
    """A site's reply was malformed, tampered with, or for another query or key."""


class EnclaveError(PetsError):
    """The enclave service could not be reached, refused this analyst's token, or answered
    out of protocol; ``rule`` says which (``unreachable``, ``timeout``, ``token``...)."""

    def __init__(self, cause: str, rule: str = ""):
        super().__init__(f"the enclave service failed: {cause}")
        self.cause = cause
        self.rule = rule


@dataclass(frozen=True)
class DataProblem:
    """One problem in a registry file: the column, the 1-based data rows, and what is wrong.

    ``rows`` is empty for a problem with a whole column (missing, unknown). The problem text
    states the rule (allowed categories, bounds), never the offending value. ``count`` is the
    number of rows when they are not listed (:meth:`counted`: what leaves a site).
    """

    column: str
    problem: str
    rows: tuple[int, ...] = ()
    count: int = 0

    @property
    def n_rows(self) -> int:
        """How many rows have this problem (0: the whole column)."""
        return len(self.rows) or self.count

    def counted(self) -> DataProblem:
        """This problem with its rows replaced by their number: no row leaves the site."""
        return DataProblem(self.column, self.problem, (), self.n_rows)

    def describe(self, max_rows: int = 10) -> str:
        if not self.rows:
            if self.count:
                word = "row" if self.count == 1 else "rows"
                return f"column {self.column!r}, {self.count} {word}: {self.problem}"
            return f"column {self.column!r}: {self.problem}"
        shown = ", ".join(str(r) for r in self.rows[:max_rows])
        more = f" and {len(self.rows) - max_rows} more" if len(self.rows) > max_rows else ""
        word = "row" if len(self.rows) == 1 else "rows"
        return f"column {self.column!r}, {word} {shown}{more}: {self.problem}"


class DataValidationError(PetsError, ValueError):
    """A site's registry data does not match the schema. ``problems`` lists every bad column
    and every bad value with its row number (1 = the first data row); no value is echoed."""

    def __init__(self, source: str, problems: Sequence[DataProblem], site: str | None = None):
        self.source = source
        self.problems = tuple(problems)
        self.site = site
        where = f"site {site!r}: " if site else ""
        n = len(self.problems)
        lines = [f"{where}{source} does not match the schema ({n} problem{'s' * (n != 1)}):"]
        lines += [f"  - {p.describe()}" for p in self.problems]
        super().__init__("\n".join(lines))

    def counted(self) -> DataValidationError:
        """What a site tells anyone else: the rules broken and how many rows break each,
        without row numbers or the source's location."""
        return DataValidationError("its registry data", [p.counted() for p in self.problems],
                                   self.site)


class ConfigError(PetsError, ValueError):
    """A site configuration file is not valid; the message names the file, site and key."""


class InternalError(PetsError, RuntimeError):
    """A bug in pets_widgets: an invariant that should hold by construction did not."""
