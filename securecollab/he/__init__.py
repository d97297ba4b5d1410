"""CKKS homomorphic-encryption inference: contexts, fast encrypted linear layers, square-activation MLPs.

The client keeps the secret key (:func:`make_context`) and sends
:func:`public_bytes`; the server opens it with :func:`load_public` and
evaluates a compiled model (:class:`HEMlp` one query per ciphertext,
:class:`HEMlpBatched` one input per slot). The ``*_bytes`` encryptions are
seeded (symmetric-key) ciphertexts, half the upload of public-key ones.
"""

from securecollab.he.context import PublicContext, load_public, make_context, public_bytes
from securecollab.he.linear import DiagonalPlan, EncryptedLinear
from securecollab.he.mlp import (BatchLayout, HEMlp, HEMlpBatched, decrypt_batch, decrypt_logits,
                                 encrypt_batch, encrypt_batch_bytes, encrypt_input, encrypt_input_bytes)
from securecollab.he.seal import SealKit

__all__ = [
    "BatchLayout", "DiagonalPlan", "EncryptedLinear", "HEMlp", "HEMlpBatched", "PublicContext", "SealKit",
    "decrypt_batch", "decrypt_logits", "encrypt_batch", "encrypt_batch_bytes", "encrypt_input",
    "encrypt_input_bytes",
    "load_public", "make_context", "public_bytes",
]
