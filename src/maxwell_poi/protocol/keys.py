"""Agent signing keys (Ed25519) and Maxwell's keyring of enrolled agents."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from securesystemslib.signer import CryptoSigner, SSlibKey

from .errors import KeyFormatError, UnknownAgentError
from .files import write_json_atomic


def public_key_from_hex(hex_key: str) -> SSlibKey:
    try:
        raw = bytes.fromhex(hex_key)
        if len(raw) != 32:
            raise ValueError(f"{len(raw)} bytes")
        Ed25519PublicKey.from_public_bytes(raw)
    except ValueError as exc:
        raise KeyFormatError("an Ed25519 public key as 64 hex characters", repr(hex_key[:80])) from exc
    return _sslib_key(hex_key)


def _sslib_key(hex_key: str) -> SSlibKey:
    key_dict = {"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": hex_key}}
    return SSlibKey.from_dict(_keyid(key_dict), dict(key_dict))


def _keyid(key_dict: dict) -> str:
    """Key id as TUF/securesystemslib define it: sha256 of the canonical JSON of the key."""
    canonical = json.dumps(key_dict, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


class AgentKey:
    """An agent's private signing key. Lives with the agent; Maxwell only ever sees the public half."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._private = private_key
        raw = private_key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        self.public_hex = raw.hex()
        self.public_key = _sslib_key(self.public_hex)
        self.signer = CryptoSigner(private_key, self.public_key)

    @property
    def private_key(self) -> Ed25519PrivateKey:
        """For signers other than DSSE (Maxwell's EAR JWTs); never leaves its owner."""
        return self._private

    @property
    def keyid(self) -> str:
        return self.public_key.keyid

    @classmethod
    def generate(cls) -> AgentKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def ensure(cls, path: Path) -> AgentKey:
        """The key at `path`, generated and saved there first when there is none."""
        if not Path(path).exists():
            cls.generate().save(path)
        return cls.load(path)

    def save(self, path: Path) -> None:
        pem = self._private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)

    @classmethod
    def load(cls, path: Path) -> AgentKey:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise KeyFormatError("a readable PEM private key file", f"{path}: {exc.strerror}") from exc
        try:
            key = serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFormatError("an unencrypted PKCS#8 PEM Ed25519 key", f"{path}: {exc}") from exc
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFormatError("an Ed25519 private key", f"{path}: {type(key).__name__}")
        return cls(key)


class Keyring:
    """Maxwell's record of which public key speaks for which agent id (JSON file on disk)."""

    def __init__(self, keys: dict[str, str] | None = None) -> None:
        self._hex: dict[str, str] = {}
        self._keys: dict[str, SSlibKey] = {}
        for agent_id, hex_key in (keys or {}).items():
            self.enroll(agent_id, hex_key)

    def enroll(self, agent_id: str, public_hex: str) -> None:
        key = public_key_from_hex(public_hex)
        self._hex[agent_id] = public_hex
        self._keys[agent_id] = key

    def key_for(self, agent_id: str) -> SSlibKey:
        try:
            return self._keys[agent_id]
        except KeyError:
            raise UnknownAgentError(agent_id, list(self._keys)) from None

    def agent_for_keyid(self, keyid: str) -> str | None:
        return next((a for a, k in self._keys.items() if k.keyid == keyid), None)

    def __contains__(self, agent_id: object) -> bool:
        return agent_id in self._keys

    def agents(self) -> list[str]:
        return sorted(self._keys)

    def save(self, path: Path) -> None:
        write_json_atomic(path, {"agents": self._hex}, sort_keys=True)

    @classmethod
    def load(cls, path: Path) -> Keyring:
        if not Path(path).exists():
            return cls()
        try:
            data = json.loads(Path(path).read_text())
            agents = data["agents"]
            if not isinstance(agents, dict):
                raise TypeError("agents is not an object")
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFormatError('a keyring {"agents": {id: hex}}', f"{path}: {exc}") from exc
        return cls(agents)
