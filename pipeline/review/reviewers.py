"""Who may sign: reviewers' names, public keys and roles in a committed file, and the reviewers' Ed25519 keys.

A public key is written `ed25519:<base64 of the 32 raw bytes>`, one line a reviewer pastes into reviewers.yaml; its
key id (the DSSE envelope's `keyid`) is the SHA-256 of those bytes, in hex. Only `cryptography` touches key material.
"""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline import PipelineError
from pipeline.params import first_error, read_yaml

PREFIX = "ed25519:"
Role = Literal["approve", "waive"]  # approve: approve or reject a version; waive: accept a failing check


class Reviewer(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(min_length=1)
    public_key: str = Field(description="ed25519:<base64 of the raw 32-byte key>, from `review keygen`")
    roles: list[Role] = Field(min_length=1)
    mlflow_user: str | None = Field(default=None, description="the user MLflow records on this person's runs")
    revoked: bool = False

    @field_validator("public_key")
    @classmethod
    def _ed25519(cls, value: str) -> str:
        raw_key(value)
        return value

    @property
    def keyid(self) -> str:
        return key_id(raw_key(self.public_key))


class Reviewers(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reviewers: list[Reviewer] = []

    def by_keyid(self, keyid: str) -> Reviewer | None:
        return next((r for r in self.reviewers if r.keyid == keyid), None)


def raw_key(line: str) -> bytes:
    """The 32 raw bytes of an `ed25519:<base64>` public key; ValueError (read by pydantic) when it is not one."""
    if not line.startswith(PREFIX):
        raise ValueError(f"must start with {PREFIX}")
    try:
        raw = base64.b64decode(line.removeprefix(PREFIX), validate=True)
    except ValueError:
        raise ValueError("is not base64") from None
    if len(raw) != 32:
        raise ValueError(f"is {len(raw)} bytes, an Ed25519 public key is 32")
    return raw


def key_id(raw: bytes) -> str:
    return hashlib.sha256(raw).hexdigest()


def load_reviewers(path: Path) -> Reviewers:
    """The reviewers file, validated: a malformed one is one line naming the file and the field."""
    raw = read_yaml(path)
    try:
        found = Reviewers.model_validate(raw if raw is not None else {})
    except ValidationError as exc:
        raise PipelineError(f"{path}: {first_error(exc)}") from None
    ids = [r.keyid for r in found.reviewers]
    names = [r.name for r in found.reviewers]
    for what, values in (("public_key", ids), ("name", names)):
        repeated = next((i for i, v in enumerate(values) if values.index(v) != i), None)
        if repeated is not None:
            raise PipelineError(f"{path}: reviewers.{repeated}.{what}: listed twice")
    return found


def public_line(private) -> str:
    """The `ed25519:<base64>` line of a private key's public half."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    raw = private.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return PREFIX + base64.b64encode(raw).decode("ascii")


def keygen(out: Path) -> str:
    """A new Ed25519 private key written to `out` (PEM, PKCS#8, readable by its owner only); its public line.
    The key is not encrypted: keep it where only its owner reads it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    try:
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PipelineError(f"{out}: already exists; a key is never overwritten") from None
    except OSError as exc:
        raise PipelineError(f"{out}: cannot write ({exc.strerror})") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return public_line(private)


def load_private_key(path: Path):
    """A reviewer's Ed25519 private key from its PEM file."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    try:
        key = load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        raise PipelineError(f"{path}: key file not found") from None
    except (OSError, ValueError, TypeError) as exc:
        raise PipelineError(f"{path}: not an unencrypted PEM private key ({str(exc).splitlines()[0]})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise PipelineError(f"{path}: not an Ed25519 key ({type(key).__name__})")
    return key


def verify_signature(reviewer: Reviewer, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(raw_key(reviewer.public_key)).verify(signature, message)
    except InvalidSignature:
        return False
    return True
