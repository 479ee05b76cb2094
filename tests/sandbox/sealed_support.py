"""Test support: hand a folder to a real sandbox the way the runner does (sealed copies + hand-off socket).

The runner gets its sealed copies from verification against the signed manifest; these tests have no
signature, so they seal and hash the folder directly (``seal_folder``) and pin what they sealed.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from secure_run.manifests.sealed import SealedFolder, seal_folder
from secure_run.sandbox import SandboxPolicy
from secure_run.sandbox.handoff import HandoffServer
from secure_run.sandbox.protocol import PinnedFileModel


def sealed(root: Path) -> SealedFolder:
    """Every file of ``root`` sealed and hashed."""
    return seal_folder(root, sorted(p.name for p in root.iterdir()))


def pins_of(folder: SealedFolder) -> dict[str, PinnedFileModel]:
    """The pins the runner would send: verified sha256 + the sealed copy's identity."""
    return {c.name: PinnedFileModel(sha256=c.sha256, identity=c.identity) for c in folder.copies()}


@contextmanager
def handed_off(root: Path, policy: SandboxPolicy) -> Iterator[tuple[SandboxPolicy, dict[str, PinnedFileModel]]]:
    """``policy`` with a hand-off of ``root``'s sealed copies mounted, and the request's pins.

    Keep the block open until the worker has received the files (for a persistent worker: until it
    has loaded); the worker's descriptors keep the copies alive after that.
    """
    with sealed(root) as folder, HandoffServer([(c.name, c.fd) for c in folder.copies()]) as server:
        yield policy.with_overrides(handoff_dir=server.mount_dir), pins_of(folder)
