"""Cryptographic building blocks of secure aggregation: key agreement, mask expansion, share encryption.

Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning",
CCS 2017, section 4: each client holds two Diffie-Hellman key pairs per round, (c_u) to
encrypt the Shamir shares it sends other clients through the server, and (s_u) whose
pairwise agreements s_uv seed the masks that cancel in the sum. Here the key agreement is
X25519 followed by HKDF-SHA256, the PRG is the ChaCha20 keystream, and shares travel
under AES-256-GCM, all from the `cryptography` package.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from fedrun.privacy.shamir import ELEMENT_BYTES

MODULUS = 2**32  # masked vectors and sums live in Z_{2^32}, one uint32 per coordinate
SEED_BYTES = 32
PUBLIC_KEY_BYTES = 32
SEALED_SHARES_BYTES = 2 * ELEMENT_BYTES + 16  # two field elements + the GCM tag

# HKDF labels keep the two uses of one agreement (and the two key pairs) apart.
_MASK_INFO = b"fedrun secagg pairwise mask"
_CIPHER_INFO = b"fedrun secagg share encryption"


class SecAggAbort(RuntimeError):
    """A secure-aggregation round cannot finish safely (too few clients, bad shares): no sum."""


@dataclass(frozen=True)
class PublicKeys:
    """What a client advertises in round 0: its two X25519 public keys (raw, 32 bytes each)."""

    cipher: bytes  # c_u^PK: agreements encrypt the shares sent to other clients
    mask: bytes  # s_u^PK: agreements seed the pairwise masks

    nbytes = 2 * PUBLIC_KEY_BYTES


def client_secret(round_seed: int, client_id: int, purpose: bytes) -> bytes:
    """32 secret bytes for `(round_seed, client_id, purpose)`.

    Derived, so that a simulated run is reproducible from its seed. A real deployment
    draws every client secret from os.urandom(32) on the device: a 63-bit round seed
    known to the server offers no secrecy at all.
    """
    hkdf = HKDF(algorithm=SHA256(), length=SEED_BYTES, salt=b"fedrun secagg",
                info=purpose + b"|" + client_id.to_bytes(8, "little", signed=True))
    return hkdf.derive(round_seed.to_bytes(16, "little", signed=True))


def private_key(seed: bytes) -> X25519PrivateKey:
    return X25519PrivateKey.from_private_bytes(seed)


def public_bytes(key: X25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def mask_seed(own: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The 32-byte seed s_uv of the pairwise mask; the same from either end of the pair."""
    return _agree(own, peer_public, info=_MASK_INFO)


def prg_mask(seed: bytes, length: int) -> torch.Tensor:
    """(length,) int64 in [0, 2^32): the ChaCha20 keystream of `seed` read as little-endian uint32.

    A zero nonce is safe because every seed here keys exactly one keystream.
    """
    stream = Cipher(algorithms.ChaCha20(seed, bytes(16)), mode=None).encryptor().update(bytes(4 * length))
    return torch.from_numpy(np.frombuffer(stream, dtype="<u4").astype(np.int64))


def seal_shares(own: X25519PrivateKey, peer_public: bytes, shares: tuple[int, int], *,
                sender: int, recipient: int) -> bytes:
    """Encrypt (share of s_sender^SK, share of b_sender) for `recipient`, so the server routing it learns nothing."""
    plaintext = b"".join(y.to_bytes(ELEMENT_BYTES, "little") for y in shares)
    header = _header(sender, recipient)
    return AESGCM(_agree(own, peer_public, info=_CIPHER_INFO)).encrypt(header, plaintext, header)


def open_shares(own: X25519PrivateKey, peer_public: bytes, sealed: bytes, *,
                sender: int, recipient: int) -> tuple[int, int]:
    header = _header(sender, recipient)
    try:
        plaintext = AESGCM(_agree(own, peer_public, info=_CIPHER_INFO)).decrypt(header, sealed, header)
    except InvalidTag:
        raise SecAggAbort(f"shares from client {sender} to client {recipient} fail authentication") from None
    return (int.from_bytes(plaintext[:ELEMENT_BYTES], "little"),
            int.from_bytes(plaintext[ELEMENT_BYTES:], "little"))


def _agree(own: X25519PrivateKey, peer_public: bytes, *, info: bytes) -> bytes:
    shared = own.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=SHA256(), length=SEED_BYTES, salt=None, info=info).derive(shared)


def _header(sender: int, recipient: int) -> bytes:
    # Nonce and associated data: unique per direction under the pair's one key, and
    # binds the ciphertext to who sent it to whom (a swapped route fails to decrypt).
    return sender.to_bytes(6, "little") + recipient.to_bytes(6, "little")
