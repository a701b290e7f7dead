"""The audit record ``RUN_DIR/audit/audit.json``: its one definition and its one reader.

Written by ``dpfl-client audit`` (:mod:`dpfl.client.audit`), read by the report
(:mod:`dpfl.shared.report.build`). Standard library only, so a report of a run without an
audit loads nothing heavy. The figures come from :mod:`dpfl.shared.privacy.audit` (white
box) and :mod:`dpfl.shared.privacy.mia` (black box).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dpfl.shared.errors import StateError

AUDIT_FORMAT = "dpfl-audit/1"
AUDIT_JSON = "audit/audit.json"  #: relative to the run directory
NO_BUDGET = ("The audit trained on its own copy of the data under a temporary ledger, deleted "
             "afterwards: it spent no site's privacy budget. ε̂ is a lower bound on the privacy "
             "loss of the mechanism as built (95 % confidence); it can only show a claimed ε "
             "wrong, never prove it right.")


def read_audit(run_dir: str | Path) -> dict[str, Any] | None:
    """The audit record of ``run_dir`` (``None`` when it holds none)."""
    path = Path(run_dir) / AUDIT_JSON
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise StateError(f"audit record {path} is unreadable ({exc}); rerun `dpfl-client "
                         "audit`") from exc
    if not isinstance(d, dict) or d.get("format") != AUDIT_FORMAT:
        raise StateError(f"{path} is not a dpfl audit record (format {AUDIT_FORMAT}); rerun "
                         "`dpfl-client audit`")
    return d
