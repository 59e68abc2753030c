"""One registry of checkpointed regularizer state (adaptive KL controller, ptx stream position).

Every trainer owns one ``RegularizerState``; whatever registers in it is written into each checkpoint and restored
by ``train(resume_from_checkpoint=...)``, so a resumed run continues with the coefficient and the data it had
(verl #2653 lost the controller). The state is identical on every rank (controllers see gathered values; the ptx
stream advances in lockstep), so the main process writes one JSON file.
"""

from __future__ import annotations

import json
import os
from typing import Any, Protocol

STATE_FILE = "trl_regularizers_state.json"


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class RegularizerState:
    """Named ``state_dict``-able objects, saved and restored together."""

    def __init__(self) -> None:
        self._objects: dict[str, Stateful] = {}

    def register(self, name: str, obj: Stateful) -> None:
        if name in self._objects:
            raise ValueError(f"regularizer state {name!r} is registered twice")
        self._objects[name] = obj

    def __contains__(self, name: str) -> bool:
        return name in self._objects

    def __getitem__(self, name: str) -> Stateful:
        return self._objects[name]

    def save(self, checkpoint: str) -> None:
        """Write ``STATE_FILE`` into the checkpoint folder (nothing when no state is registered)."""
        if self._objects:
            with open(os.path.join(checkpoint, STATE_FILE), "w") as handle:
                json.dump({name: obj.state_dict() for name, obj in self._objects.items()}, handle, indent=2)

    def load(self, checkpoint: str) -> None:
        """Restore every registered object from the checkpoint folder; a clear error if it lacks one."""
        if not self._objects:
            return
        path = os.path.join(checkpoint, STATE_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} is missing: this checkpoint was not written by a trl_regularizers trainer with "
                f"the same regularizers ({', '.join(self._objects)}), so their state cannot be restored."
            )
        with open(path) as handle:
            saved = json.load(handle)
        for name, obj in self._objects.items():
            if name not in saved:
                raise KeyError(f"{path} has no state for {name!r} (it has: {', '.join(saved) or 'nothing'})")
            obj.load_state_dict(saved[name])
