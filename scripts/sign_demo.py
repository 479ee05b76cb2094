"""Sign the embedded demo model with a fresh DEMO key and pin it in manifests/trusted/.

Demo trust only, not for production: the private key is generated in a temporary folder, used
once, and discarded; only its public key (``manifests/trusted/keys/demo-superlinear.pub.pem``),
the signature (``model/demo/superlinear-demo/model.sig``) and the lock entry
(``superlinear-demo`` in ``manifests/trusted/models.lock.json``) are kept. Run it again only when
the demo folder's bytes change (the builder is deterministic, so rebuilding does not require it).

    .venv/bin/python scripts/sign_demo.py
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from secure_run import manifests

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "model" / "demo" / "superlinear-demo"
TRUSTED = ROOT / "manifests" / "trusted"
PUB = TRUSTED / "keys" / "demo-superlinear.pub.pem"
NAME = "superlinear-demo"


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="secure-run-demo-key-"))
    try:
        keys = manifests.generate_key(tmp / "demo-superlinear.pem")
        signed = manifests.sign_model(DEMO, keys.private)
        PUB.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(keys.public, PUB)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    result = manifests.verify_model(DEMO, manifests.KeyTrust.from_file(PUB))
    assert result.root_digest == signed.root_digest
    manifests.pin_model(
        TRUSTED / "models.lock.json",
        NAME,
        root_digest=result.root_digest,
        signer=result.signer,
        public_key=os.path.relpath(PUB, TRUSTED),
        path=os.path.relpath(DEMO, TRUSTED),
        note="DEMO trust only (embedded demo model, random weights); not for production",
        policy="builtin:demo",
    )
    print(f"signed {DEMO.relative_to(ROOT)}: root sha256:{result.root_digest}")


if __name__ == "__main__":
    main()
