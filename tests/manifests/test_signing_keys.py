"""Issue 13 item 8: encrypted PKCS#8 keys (passphrase from an env var, a file or a prompt) and
PKCS#11 signing against a real SoftHSM2 token, verified by secure-run and by model_signing 1.1.1.

The SoftHSM2 tests need Debian's ``softhsm2`` (``/usr/lib/softhsm/libsofthsm2.so``) and
``python-pkcs11``; without them they are skipped locally and *fail* under CI (``CI=true``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from secure_run.errors import UsageError
from secure_run.manifests import KeyTrust, generate_key, sign_model, verify_model
from secure_run.runner.cli import cli

PASS = "correct horse battery staple"


def _cli(*args: str, env: dict[str, str] | None = None, stdin: str | None = None) -> Any:
    return CliRunner().invoke(cli, list(args), env=env, input=stdin)


# -- encrypted PKCS#8 ---------------------------------------------------------------------------


def test_encrypted_key_roundtrip_library(model: Path, tmp_path: Path) -> None:
    keys = generate_key(tmp_path / "org.pem", passphrase=PASS.encode())
    assert b"-----BEGIN ENCRYPTED PRIVATE KEY-----" in keys.private.read_bytes()
    asked: list[int] = []

    def passphrase() -> bytes:
        asked.append(1)
        return PASS.encode()

    sign_model(model, keys.private, passphrase=passphrase)
    assert asked == [1]
    assert verify_model(model, KeyTrust.from_file(keys.public)).signer.key_sha256 == keys.fingerprint


def test_encrypted_key_without_or_with_a_wrong_passphrase_is_a_usage_error(model: Path, tmp_path: Path) -> None:
    keys = generate_key(tmp_path / "org.pem", passphrase=PASS.encode())
    with pytest.raises(UsageError) as err:
        sign_model(model, keys.private)
    assert "encrypted" in err.value.message and "--key-passphrase-env" in (err.value.hint or "")
    with pytest.raises(UsageError) as err:
        sign_model(model, keys.private, passphrase=lambda: b"wrong")
    assert "wrong passphrase" in err.value.message
    assert not (model / "model.sig").exists()


def test_plain_key_never_asks_for_a_passphrase(model: Path, keys: tuple[Path, Path]) -> None:
    def never() -> bytes:
        raise AssertionError("asked")

    sign_model(model, keys[0], passphrase=never)


def test_cli_encrypted_key_from_env_file_and_prompt(model: Path, tmp_path: Path) -> None:
    key = tmp_path / "org.pem"
    res = _cli("keygen", "--out", str(key), "--key-passphrase-env", "SR_PASS", "--json", env={"SR_PASS": PASS})
    assert res.exit_code == 0, res.output
    assert b"ENCRYPTED PRIVATE KEY" in key.read_bytes()
    pub = tmp_path / "org.pub.pem"

    res = _cli("sign", str(model), "--key", str(key), "--key-passphrase-env", "SR_PASS", env={"SR_PASS": PASS})
    assert res.exit_code == 0, res.output
    assert _cli("verify", str(model), "--public-key", str(pub)).exit_code == 0

    pass_file = tmp_path / "pass.txt"
    pass_file.write_text(PASS + "\n")
    (model / "model.sig").unlink()
    res = _cli("sign", str(model), "--key", str(key), "--key-passphrase-file", str(pass_file))
    assert res.exit_code == 0, res.output

    # no passphrase and no terminal: exit 2 with the remedy, no traceback
    (model / "model.sig").unlink()
    res = _cli("sign", str(model), "--key", str(key), "--json")
    assert res.exit_code == 2 and json.loads(res.output)["error"]["kind"] == "usage"
    res = _cli("sign", str(model), "--key", str(key), "--key-passphrase-env", "SR_PASS", env={"SR_PASS": "nope"})
    assert res.exit_code == 2 and "wrong passphrase" in res.output
    res = _cli("sign", str(model), "--key", str(key), "--key-passphrase-env", "UNSET_VAR_X")
    assert res.exit_code == 2 and "UNSET_VAR_X" in res.output


def test_cli_prompts_on_a_terminal(model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = generate_key(tmp_path / "org.pem", passphrase=PASS.encode())
    monkeypatch.setattr("secure_run.runner.cmd_manifests._stdin_is_terminal", lambda: True)
    res = _cli("sign", str(model), "--key", str(keys.private), stdin=PASS + "\n")
    assert res.exit_code == 0, res.output


def test_cli_keygen_encrypt_needs_a_passphrase_source(tmp_path: Path) -> None:
    res = _cli("keygen", "--out", str(tmp_path / "k.pem"), "--encrypt")
    assert res.exit_code == 2 and not (tmp_path / "k.pem").exists()


# -- PKCS#11 with SoftHSM2 ----------------------------------------------------------------------

SOFTHSM = Path("/usr/lib/softhsm/libsofthsm2.so")
PIN = "1234"


def _need_softhsm() -> None:
    missing = []
    if not SOFTHSM.exists() or shutil.which("softhsm2-util") is None:
        missing.append("Debian package softhsm2")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        missing.append("python-pkcs11")
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must install {', '.join(missing)} for the PKCS#11 tests")
        pytest.skip(f"needs {', '.join(missing)}")


@pytest.fixture(scope="module")
def token(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A SoftHSM2 token 'sr-test' with an EC P-256 key pair 'model-signing' (id 01); yields the URI."""
    _need_softhsm()
    import pkcs11
    from pkcs11.util.ec import encode_named_curve_parameters

    folder = tmp_path_factory.mktemp("softhsm")
    (folder / "tokens").mkdir()
    conf = folder / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {folder / 'tokens'}\nobjectstore.backend = file\nlog.level = ERROR\n")
    old = os.environ.get("SOFTHSM2_CONF")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "sr-test", "--so-pin", "5678", "--pin", PIN],
                   check=True, capture_output=True, timeout=60)
    lib = pkcs11.lib(str(SOFTHSM))
    with lib.get_token(token_label="sr-test").open(rw=True, user_pin=PIN) as session:
        params = session.create_domain_parameters(
            pkcs11.KeyType.EC, {pkcs11.Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True
        )
        params.generate_keypair(store=True, label="model-signing", id=b"\x01")
    yield f"pkcs11:token=sr-test;object=model-signing;id=%01?module-path={SOFTHSM}"
    if old is None:
        os.environ.pop("SOFTHSM2_CONF", None)
    else:
        os.environ["SOFTHSM2_CONF"] = old


def _token_public_pem(uri: str, path: Path) -> Path:
    from cryptography.hazmat.primitives import serialization

    from secure_run.manifests.pkcs11 import Pkcs11Signer

    with Pkcs11Signer(uri + f"&pin-value={PIN}") as signer:
        path.write_bytes(signer.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path


def test_pkcs11_sign_verifies_with_secure_run(token: str, model: Path, tmp_path: Path) -> None:
    from secure_run.manifests.pkcs11 import Pkcs11Signer

    with Pkcs11Signer(token, pin=lambda: PIN.encode()) as signer:
        result = sign_model(model, signer=signer)
    pub = _token_public_pem(token, tmp_path / "token.pub.pem")
    verified = verify_model(model, KeyTrust.from_file(pub))
    assert verified.signer.key_sha256 == result.signer.key_sha256
    (model / "README.md").write_text("# tampered\n")
    with pytest.raises(Exception) as err:
        verify_model(model, KeyTrust.from_file(pub))
    assert getattr(err.value, "rule", None) == "DIGEST-MISMATCH"


@pytest.mark.interop
def test_pkcs11_signature_verifies_with_model_signing(token: str, model: Path, tmp_path: Path) -> None:
    pin_file = tmp_path / "pin"
    pin_file.write_text(PIN + "\n")
    res = _cli("sign", str(model), "--pkcs11-uri", token + f"&pin-source=file:{pin_file}", "--json")
    assert res.exit_code == 0, res.output
    pub = _token_public_pem(token, tmp_path / "token.pub.pem")
    home = tmp_path / "home"
    home.mkdir()
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    ref = Path(sys.executable).parent / "model_signing"
    r = subprocess.run([str(ref), "verify", "key", "--signature", str(model / "model.sig"), "--public_key", str(pub), str(model)],
                       capture_output=True, text=True, env=env, timeout=120, check=False)
    assert r.returncode == 0 and "Verification succeeded" in r.stdout, r.stdout + r.stderr
    assert _cli("verify", str(model), "--public-key", str(pub)).exit_code == 0


def test_pkcs11_cli_errors_are_usage_errors(token: str, model: Path) -> None:
    res = _cli("sign", str(model), "--pkcs11-uri", token + "&pin-value=9999", "--json")
    assert res.exit_code == 2 and "PIN" in json.loads(res.output)["error"]["message"]
    assert "9999" not in res.output  # the PIN is never echoed
    res = _cli("sign", str(model), "--pkcs11-uri", token.replace("object=model-signing;id=%01", "object=nope") + f"&pin-value={PIN}")
    assert res.exit_code == 2 and "NoSuchKey" in res.output
    res = _cli("sign", str(model), "--pkcs11-uri", "pkcs11:object=x?module-path=/nonexistent.so&pin-value=1")
    assert res.exit_code == 2 and "cannot load the PKCS#11 module" in res.output
    res = _cli("sign", str(model), "--pkcs11-uri", token, "--key", "k.pem")
    assert res.exit_code == 2
    assert not (model / "model.sig").exists()


@pytest.mark.parametrize(
    "uri",
    ["pkcs12:token=x;object=y", "pkcs11:token=x", "pkcs11:object=y;object=z", "pkcs11:object=y?pin-value=1&pin-source=f", "pkcs11:bogus=1;object=y"],
)
def test_pkcs11_uri_parsing_refuses(uri: str) -> None:
    from secure_run.manifests.pkcs11 import parse_pkcs11_uri

    with pytest.raises(UsageError):
        parse_pkcs11_uri(uri)


def test_pkcs11_uri_parsing() -> None:
    from secure_run.manifests.pkcs11 import parse_pkcs11_uri

    u = parse_pkcs11_uri("pkcs11:token=My%20Org;object=k;id=%01%ff?module-path=/m.so&pin-source=file:/p")
    assert (u.token, u.object, u.id, u.module_path, u.pin_source) == ("My Org", "k", b"\x01\xff", "/m.so", "file:/p")
    assert u.display == "pkcs11:token=My%20Org;object=k;id=%01%ff"


def test_pkcs11_certificate_method(token: str, model: Path, tmp_path: Path) -> None:
    """--pkcs11-uri with --cert: the leaf certificate is for the token's key, the chain verifies."""
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from secure_run.manifests import CertificateTrust

    token_pub = serialization.load_pem_public_key(_token_public_pem(token, tmp_path / "t.pub.pem").read_bytes())
    root_key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    root = (
        x509.CertificateBuilder().subject_name(name("org-root")).issuer_name(name("org-root")).public_key(root_key.public_key())
        .serial_number(1).not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )  # fmt: skip
    leaf = (
        x509.CertificateBuilder().subject_name(name("hsm-signer")).issuer_name(name("org-root")).public_key(token_pub)  # type: ignore[arg-type]
        .serial_number(2).not_valid_before(now - dt.timedelta(hours=1)).not_valid_after(now + dt.timedelta(days=7))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.RFC822Name("hsm@example.com")]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
        .sign(root_key, hashes.SHA256())
    )  # fmt: skip
    (tmp_path / "root.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    res = _cli("sign", str(model), "--pkcs11-uri", token + f"&pin-value={PIN}", "--cert", str(tmp_path / "leaf.pem"))
    assert res.exit_code == 0, res.output
    result = verify_model(model, CertificateTrust.from_file(tmp_path / "root.pem", "email:hsm@example.com"))
    assert result.signer.method == "certificate"
