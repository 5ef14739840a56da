"""Ed25519 signatures over model manifests.

The manifest already holds every file's sha256, so a signature over its canonical JSON bytes
covers the weights too. The publisher holds the private key (`keygen` writes it, mode 0600);
workers pin one or more public keys (VQ_MODEL_PUBKEY) and refuse anything else, so write access
to Redis alone is no longer enough to change what the fleet runs.

Public keys are parsed here without `cryptography` (an Ed25519 SubjectPublicKeyInfo is a fixed
12-byte DER prefix plus the 32-byte key), so reading the settings needs no extra package;
signing and verifying import it lazily.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# DER for SEQUENCE { SEQUENCE { OID 1.3.101.112 (Ed25519) }, BIT STRING (32 bytes) }.
_SPKI_PREFIX = bytes.fromhex("302a300506032b6570032100")
_PEM_PUBLIC = ("-----BEGIN PUBLIC KEY-----", "-----END PUBLIC KEY-----")
SIGNATURE_BYTES = 64
PRIVATE_KEY_FILE = "signing.key"
PUBLIC_KEY_FILE = "signing.pub"
SIGN_KEY_ENV = "VQ_SIGN_KEY_FILE"
PUBKEY_ENV = "VQ_MODEL_PUBKEY"
# A key file is a handful of lines; anything larger is not one (and is not read into memory).
_MAX_KEY_FILE_BYTES = 64 * 1024


class SigningError(ValueError):
    """A key that cannot be read or used."""


class SignatureError(ValueError):
    """A manifest without a valid signature from a trusted key: the version must not be served."""


def canonical_manifest(manifest: dict[str, Any]) -> bytes:
    """The bytes that are signed: key order and whitespace fixed, so any JSON writer round-trips."""
    return json.dumps(manifest, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def key_id(public_key_b64: str) -> str:
    """A short fingerprint for logs and `registry list` (the key itself is public, but long)."""
    return hashlib.sha256(base64.b64decode(public_key_b64)).hexdigest()[:16]


# -- public keys (no cryptography needed) ---------------------------------------------------------
def _raw_from_der_or_raw(blob: bytes, what: str) -> bytes:
    if len(blob) == 32:
        return blob
    if len(blob) == len(_SPKI_PREFIX) + 32 and blob.startswith(_SPKI_PREFIX):
        return blob[len(_SPKI_PREFIX):]
    raise SigningError(f"{what} is not an Ed25519 public key (32 raw bytes or an Ed25519 SubjectPublicKeyInfo)")


def _b64(text: str, what: str) -> bytes:
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise SigningError(f"{what} is not valid base64") from None


def _parse_key_text(text: str, what: str) -> list[str]:
    """One or more keys: PEM blocks, or base64 lines (blank lines and # comments ignored)."""
    keys: list[str] = []
    text = text.strip()
    if _PEM_PUBLIC[0] in text:
        for block in text.split(_PEM_PUBLIC[0])[1:]:
            if _PEM_PUBLIC[1] not in block:
                raise SigningError(f"{what}: a PEM block has no {_PEM_PUBLIC[1]}")
            body = block.split(_PEM_PUBLIC[1], 1)[0]
            keys.append(base64.b64encode(_raw_from_der_or_raw(_b64(body, what), what)).decode())
        return keys
    if "PRIVATE KEY" in text:
        raise SigningError(f"{what} is a private key: give workers the public key (signing.pub)")
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keys.append(base64.b64encode(_raw_from_der_or_raw(_b64(line, what), what)).decode())
    return keys


def parse_public_keys(value: str) -> tuple[str, ...]:
    """Trusted keys from a setting: comma-separated entries, each a file or a key (PEM or base64).

    Returns the raw 32-byte keys, base64-encoded. Several keys are for rotation: a worker accepts
    a signature from any of them.
    """
    keys: list[str] = []
    for entry in value.split(","):
        entry = entry.strip()
        if not entry:
            continue
        if _PEM_PUBLIC[0] in entry or "PRIVATE KEY" in entry:
            keys += _parse_key_text(entry, "the inline PEM key")
            continue
        path = Path(entry).expanduser()
        if path.is_file():
            if path.stat().st_size > _MAX_KEY_FILE_BYTES:
                raise SigningError(f"{path} is too large to be a public key file")
            found = _parse_key_text(path.read_text(errors="replace"), str(path))
            if not found:
                raise SigningError(f"{path} holds no public key")
            keys += found
            continue
        try:
            keys.append(base64.b64encode(_raw_from_der_or_raw(_b64(entry, "key"), "key")).decode())
        except SigningError:
            raise SigningError(
                f"{entry[:60]!r} is neither a readable file nor an Ed25519 public key (PEM or base64)"
            ) from None
    if not keys:
        raise SigningError("no public key given")
    return tuple(dict.fromkeys(keys))


# -- signing and verifying (cryptography) ----------------------------------------------------------
def generate_keypair(out: Path | str) -> tuple[Path, Path]:
    """Write `signing.key` (PKCS#8 PEM, mode 0600) and `signing.pub` (PEM) into `out`; never overwrite."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    private_path, public_path = out / PRIVATE_KEY_FILE, out / PUBLIC_KEY_FILE
    for path in (private_path, public_path):
        if path.exists():
            raise SigningError(f"{path} exists: refusing to overwrite a key (move it away first)")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    # Created 0600 from the start (O_EXCL): the key is never readable by others, not even briefly.
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(private_pem)
    public_path.write_bytes(public_pem)
    return private_path, public_path


def _load_private_key(path: Path | str) -> Any:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SigningError(f"cannot read the signing key {path}: {exc.strerror}") from None
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as exc:
        raise SigningError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{path} is not an Ed25519 key")
    return key


def public_key_of(sign_key: Path | str) -> str:
    """The base64 public key that verifies what `sign_key` signs."""
    from cryptography.hazmat.primitives import serialization

    raw = _load_private_key(sign_key).public_key().public_bytes(serialization.Encoding.Raw,
                                                                serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def sign_manifest(manifest: dict[str, Any], sign_key: Path | str) -> bytes:
    return _load_private_key(sign_key).sign(canonical_manifest(manifest))


def verify_manifest(manifest: dict[str, Any], signature: bytes | None, trusted: Sequence[str]) -> str:
    """The id of the trusted key that signed `manifest`; SignatureError if none did."""
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    version = manifest.get("version", "unversioned")
    if not trusted:
        raise SignatureError("no trusted public key is configured")
    if signature is None:
        raise SignatureError(f"version {version} is not signed (workers require a signature: {PUBKEY_ENV})")
    if len(signature) != SIGNATURE_BYTES:
        raise SignatureError(f"version {version} has a malformed signature ({len(signature)} bytes)")
    data = canonical_manifest(manifest)
    for b64 in trusted:
        try:
            Ed25519PublicKey.from_public_bytes(base64.b64decode(b64)).verify(signature, data)
        except InvalidSignature:
            continue
        return key_id(b64)
    raise SignatureError(
        f"version {version} has no valid signature from a trusted key "
        f"(trusted: {', '.join(key_id(k) for k in trusted)}): tampered, or signed by another key"
    )
