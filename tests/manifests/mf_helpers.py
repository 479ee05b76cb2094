"""Builders shared by the manifests tests: tiny model folders, safetensors bytes, keys, CAs, bundles."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

FIXTURES = Path(__file__).parent / "fixtures" / "oms"

DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "I64": 8, "U8": 1, "I32": 4}


def st_bytes(tensors: dict[str, tuple[str, list[int]]], metadata: dict[str, str] | None = None, fill: int = 1) -> bytes:
    """A valid safetensors file: tensors laid out in the given order, data filled with a byte pattern."""
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = metadata
    offset = 0
    for name, (dtype, shape) in tensors.items():
        n = DTYPE_BYTES[dtype]
        for d in shape:
            n *= d
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    data = bytes((fill + i) % 251 for i in range(offset))
    return struct.pack("<Q", len(raw)) + raw + data


def st_raw(header: bytes | str, data: bytes = b"", n: int | None = None) -> bytes:
    """Hand-made safetensors bytes (header text as given)."""
    h = header.encode() if isinstance(header, str) else header
    return struct.pack("<Q", len(h) if n is None else n) + h + data


CONFIG_JSON = """{
  "architectures": [
    "SuperlinearExpForCausalLM"
  ],
  "model_type": "superlinear-exp",
  "_attn_implementation": "block-span-gqa",
  "hidden_size": 8,
  "num_hidden_layers": 2,
  "time_step_limit": [
    0.0,
    Infinity
  ],
  "torch_dtype": "bfloat16",
  "vocab_size": 16
}
"""


def write_model(root: Path, *, shards: int = 2) -> Path:
    """A small, clean model folder (what `secure-run import` produces, minus the report)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(CONFIG_JSON)
    (root / "generation_config.json").write_text('{"eos_token_id": [2, 11]}\n')
    (root / "tokenizer.json").write_text('{"model": {"vocab": {"auto_map": 0, "a": 1}}}\n')
    (root / "tokenizer_config.json").write_text('{"tokenizer_class": "PreTrainedTokenizerFast"}\n')
    (root / "special_tokens_map.json").write_text('{"eos_token": "<|im_end|>"}\n')
    (root / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}\n")
    (root / "LICENSE").write_text("Demo licence text.\n")
    (root / "NOTICE").write_text("Demo notice.\n")
    (root / "README.md").write_text("# demo\n")
    weight_map: dict[str, str] = {}
    total = 0
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        tensors = {f"layers.{i}.w": ("BF16", [4, 8]), f"layers.{i}.b": ("F32", [8])}
        (root / name).write_bytes(st_bytes(tensors, {"format": "pt"}, fill=i))
        for t, (dtype, shape) in tensors.items():
            weight_map[t] = name
            total += DTYPE_BYTES[dtype] * shape[0] * (shape[1] if len(shape) > 1 else 1)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return root


def snapshot(root: Path) -> dict[str, tuple[str, int, int, int]]:
    """Every entry below root: (sha256 or link target, mode, mtime_ns, size) -- to prove nothing changed."""
    out: dict[str, tuple[str, int, int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = os.lstat(p)
            if p.is_symlink():
                content = "link:" + os.readlink(p)
            elif p.is_file():
                content = hashlib.sha256(p.read_bytes()).hexdigest()
            else:
                content = "dir"
            out[str(p.relative_to(root))] = (content, st.st_mode, st.st_mtime_ns, st.st_size)
    return out


def new_key(curve: ec.EllipticCurve | None = None) -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(curve or ec.SECP256R1())


def write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> tuple[Path, Path]:
    """Write KEY.pem and KEY.pub.pem; return both paths."""
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    pub = path.with_name(path.stem + ".pub.pem")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub


@dataclass
class CA:
    root: Path
    chain: Path
    leaf: Path
    leaf_key: Path
    leaf_der: bytes

    @property
    def leaf_sha256(self) -> str:
        return hashlib.sha256(self.leaf_der).hexdigest()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_ca(
    folder: Path,
    *,
    san: str = "signer@example.com",
    eku: list[x509.ObjectIdentifier] | None = None,
    digital_signature: bool = True,
    not_before: dt.datetime | None = None,
    not_after: dt.datetime | None = None,
    prefix: str = "",
) -> CA:
    """root (CA, pathlen 1) -> intermediate (CA, pathlen 0) -> leaf (EE, KU/EKU/SAN as asked)."""
    folder.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    root_key, inter_key, leaf_key = new_key(ec.SECP384R1()), new_key(), new_key()

    def cert(subject: str, issuer: str, pub: Any, sign_key: Any, ca: bool, pathlen: int | None, exts: list[tuple[Any, bool]],
             nb: dt.datetime, na: dt.datetime) -> x509.Certificate:
        b = (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name(issuer))
            .public_key(pub)
            .serial_number(x509.random_serial_number())
            .not_valid_before(nb)
            .not_valid_after(na)
            .add_extension(x509.BasicConstraints(ca=ca, path_length=pathlen), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
        )
        if issuer != subject or not ca:
            b = b.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(sign_key.public_key()), critical=False)
        for ext, critical in exts:
            b = b.add_extension(ext, critical=critical)
        return b.sign(sign_key, hashes.SHA256())

    ca_ku = x509.KeyUsage(False, False, False, False, False, True, True, False, False)
    long_nb, long_na = now - dt.timedelta(days=1), now + dt.timedelta(days=30)
    root = cert(prefix + "test-root", prefix + "test-root", root_key.public_key(), root_key, True, 1, [(ca_ku, True)], long_nb, long_na)
    inter = cert(prefix + "test-inter", prefix + "test-root", inter_key.public_key(), root_key, True, 0, [(ca_ku, True)], long_nb, long_na)
    leaf_ku = x509.KeyUsage(digital_signature, False, False, False, False, False, False, False, False)
    exts: list[tuple[Any, bool]] = [
        (leaf_ku, True),
        (x509.ExtendedKeyUsage(eku if eku is not None else [ExtendedKeyUsageOID.CODE_SIGNING]), False),
        (x509.SubjectAlternativeName([x509.RFC822Name(san)]), False),
    ]
    leaf = cert(prefix + "signer", prefix + "test-inter", leaf_key.public_key(), inter_key, False, None, exts,
                not_before or now - dt.timedelta(hours=1), not_after or now + dt.timedelta(days=7))
    pem = serialization.Encoding.PEM
    (folder / "root.pem").write_bytes(root.public_bytes(pem))
    (folder / "chain.pem").write_bytes(inter.public_bytes(pem))
    (folder / "leaf.pem").write_bytes(leaf.public_bytes(pem))
    key_path, _ = write_key(folder / "leaf-key.pem", leaf_key)
    return CA(folder / "root.pem", folder / "chain.pem", folder / "leaf.pem", key_path, leaf.public_bytes(serialization.Encoding.DER))


def pae(payload_type: str, payload: bytes) -> bytes:
    t = payload_type.encode()
    return b"DSSEv1 %d %s %d %s" % (len(t), t, len(payload), payload)


def read_bundle(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(bundle, decoded statement)."""
    bundle = json.loads(path.read_text())
    return bundle, json.loads(base64.b64decode(bundle["dsseEnvelope"]["payload"]))


def resign(
    sig: Path,
    key_path: Path,
    mutate: Callable[[dict[str, Any]], None] | None = None,
    *,
    payload_type: str | None = None,
    bundle_mutate: Callable[[dict[str, Any]], None] | None = None,
    fix_root: bool = False,
) -> None:
    """Rewrite a key-method bundle: mutate the statement, then sign it *validly* with key_path.

    fix_root recomputes the subject digest from the (mutated) resources, so only the mutation
    under test is wrong.
    """
    bundle, statement = read_bundle(sig)
    if mutate:
        mutate(statement)
    if fix_root:
        h = hashlib.sha256()
        for r in statement["predicate"]["resources"]:
            h.update(bytes.fromhex(r["digest"]))
        statement["subject"][0]["digest"]["sha256"] = h.hexdigest()
    payload = json.dumps(statement).encode()
    ptype = payload_type or bundle["dsseEnvelope"]["payloadType"]
    key = serialization.load_pem_private_key(key_path.read_bytes(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    signature = key.sign(pae(ptype, payload), ec.ECDSA(hashes.SHA256()))
    bundle["dsseEnvelope"]["payload"] = base64.b64encode(payload).decode()
    bundle["dsseEnvelope"]["payloadType"] = ptype
    bundle["dsseEnvelope"]["signatures"] = [{"sig": base64.b64encode(signature).decode(), "keyid": ""}]
    if bundle_mutate:
        bundle_mutate(bundle)
    sig.write_text(json.dumps(bundle))
