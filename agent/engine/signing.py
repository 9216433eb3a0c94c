"""Ed25519 signatures over bundle manifests: the format, in one place.

The manifest lists the sha256 of every other file, so signing its exact bytes signs
the whole bundle. ``manifest.sig`` is JSON: the signing key's id (sha256 of the raw
public key, first 16 hex digits, so the agent can tell *which* key signed) and the
signature in base64. The agent verifies; the builder signs with the same helpers.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from agent import bounded_json


class SignatureError(ValueError):
    """A signature or key is missing, malformed, untrusted or does not match."""


def key_id(public_key: Ed25519PublicKey) -> str:
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def load_public_key(path: Path) -> Ed25519PublicKey:
    try:
        key = serialization.load_pem_public_key(path.read_bytes())
    except (OSError, ValueError) as exc:
        raise SignatureError(f"trusted key {path} cannot be read as a PEM public key: {exc}") from exc
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"trusted key {path} is not an Ed25519 key")
    return key


def load_private_key(path: Path) -> Ed25519PrivateKey:
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise SignatureError(f"signing key {path} cannot be read as an unencrypted PEM private key: {exc}") from exc
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"signing key {path} is not an Ed25519 key")
    return key


def sign(data: bytes, private_key: Ed25519PrivateKey) -> bytes:
    """The signature document (JSON bytes) for ``data``."""
    document = {
        "algorithm": "ed25519",
        "key_id": key_id(private_key.public_key()),
        "signature": base64.b64encode(private_key.sign(data)).decode(),
    }
    return json.dumps(document, indent=2).encode() + b"\n"


def verify(
    data: bytes, signature_document: bytes, trusted: list[Ed25519PublicKey], subject: str = "the manifest"
) -> str:
    """Check ``data`` (``subject``, for messages) against a signature document; return the signer's key id."""
    try:
        document = bounded_json.loads(signature_document, bounded_json.COMMAND_LIMITS)
        kid, signature = document["key_id"], base64.b64decode(document["signature"], validate=True)
    except (ValueError, KeyError, TypeError) as exc:
        raise SignatureError(f"signature file is malformed: {str(exc)[:200]}") from exc
    keys = {key_id(k): k for k in trusted}
    if kid not in keys:
        known = ", ".join(sorted(keys)) or "none"
        raise SignatureError(f"signed by key {kid}, which is not trusted (trusted: {known})")
    try:
        keys[kid].verify(signature, data)
    except InvalidSignature as exc:
        raise SignatureError(f"signature by key {kid} does not match {subject}: {subject} was altered") from exc
    return str(kid)
