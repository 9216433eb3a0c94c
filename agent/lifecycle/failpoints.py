"""Named crash points for the kill -9 tests of the engine lifecycle and of fleet rollouts.

``EDGEVIT_FAILPOINT=<name>`` makes the process (the agent, or ``edgevit-fleet``) SIGKILL itself
when it reaches that step,
exactly as a power cut or the OOM killer would stop it there; ``<name>:raise`` raises
:class:`FailpointError` there instead, as a bug in that step would. Unset, a failpoint
is one dictionary lookup. The names are listed in :data:`STEPS` and :data:`FLEET_STEPS`.
"""

from __future__ import annotations

import os
import signal

STEPS = ("install-copied", "before-state", "after-state", "after-swap", "before-commit", "after-commit")
FLEET_STEPS = ("deploys-intended", "deploys-published", "outcomes-journaled", "wave-done")  # a rollout's journal steps


class FailpointError(RuntimeError):
    """Raised at a ``<name>:raise`` failpoint: stands for an unexpected error in that step."""


def failpoint(name: str) -> None:
    assert name in STEPS or name in FLEET_STEPS, name
    wanted = os.environ.get("EDGEVIT_FAILPOINT")
    if wanted == name:
        os.kill(os.getpid(), signal.SIGKILL)
    elif wanted == f"{name}:raise":
        raise FailpointError(f"failpoint {name}")
