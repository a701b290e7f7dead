"""Names and rules of the privacy settings, torch-free (a federation's configuration and the
CLIs read them without importing Opacus): the accountants, the default one, and δ = "auto".

δ = "auto" is DPImageBench's protocol (CCS 2025): δ = 1 / (n ln n) for a private
set of n examples, e.g. 2.1e-6 for 45,000 images. Stricter than the common 1e-5 for n above
about 12,000, looser below it; always below 1/n for n >= 3. A site applies it to its own silo.
"""

from __future__ import annotations

import math

from dpfl.shared.errors import ConfigError

#: Opacus accountants dpfl can use (``dpfl.shared.privacy.accountant.KINDS`` maps each to
#: its class): ``rdp`` (Mironov 2017; Rényi DP, converted to (ε, δ) by Balle et al. 2020) and
#: ``prv`` (Gopi et al. 2021, numerical composition of privacy loss random variables; dpfl
#: reports the upper end of its error bound).
ACCOUNTANTS = ("rdp", "prv")
#: the accountant of a new ledger: ``prv`` is tighter than ``rdp`` (lower ε for the same
#: noise, so less noise for the same ε) and still an upper bound on ε
DEFAULT_ACCOUNTANT = "prv"
#: the δ setting that means 1 / (n ln n) of the private examples (:func:`delta_for_examples`)
DELTA_AUTO = "auto"


def delta_for_examples(n: int) -> float:
    """δ = 1 / (n ln n) for ``n`` private examples (n >= 3, where it is below 1/n)."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 3:
        raise ConfigError(f"delta={DELTA_AUTO!r} is 1/(n ln n) of n private examples and needs "
                          f"n >= 3 (below that it is not < 1/n), got n={n!r}; give delta as a "
                          "number")
    return 1.0 / (n * math.log(n))


def parse_delta(raw: object) -> float | str:
    """A δ setting as written in a config or on a command line: :data:`DELTA_AUTO`, or a
    number in (0, 1); anything else raises :class:`ConfigError`."""
    if isinstance(raw, str) and raw.strip().lower() == DELTA_AUTO:
        return DELTA_AUTO
    try:
        value = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"delta must be a number in (0, 1) or {DELTA_AUTO!r} (1/(n ln n) "
                          f"of the private examples), got {raw!r}") from None
    if not 0 < value < 1:
        raise ConfigError(f"delta must be in (0, 1), got {raw!r}")
    return value


def resolve_delta(delta: float | str, n: int) -> float:
    """The δ a silo of ``n`` examples uses: the number given, or 1/(n ln n) for ``auto``."""
    value = parse_delta(delta)
    return delta_for_examples(n) if value == DELTA_AUTO else float(value)
