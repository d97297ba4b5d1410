"""CKKS homomorphic-encryption inference: contexts, fast encrypted linear layers, square-activation networks (MLPs, and CNNs lowered by im2col).

The client keeps the secret key (:func:`make_context`) and sends
:func:`public_bytes`; the server opens it with :func:`load_public` and
evaluates a compiled model (:class:`HENet` one query per ciphertext,
:class:`HENetBatched` one input per slot). The ``*_bytes`` encryptions are
seeded (symmetric-key) ciphertexts, half the upload of public-key ones.
"""

from securecollab.he.batched import BatchLayout, HENetBatched, decrypt_batch, encrypt_batch, encrypt_batch_bytes
from securecollab.he.context import PublicContext, load_public, make_context, public_bytes
from securecollab.he.conv import Im2colConv, Im2colGeometry
from securecollab.he.linear import DiagonalPlan, EncryptedLinear
from securecollab.he.lower import affine_layers
from securecollab.he.net import HENet, InputEncoding, decrypt_logits, encrypt_input, encrypt_input_bytes
from securecollab.he.seal import SealKit

__all__ = [
    "BatchLayout", "DiagonalPlan", "EncryptedLinear", "HENet", "HENetBatched", "Im2colConv", "Im2colGeometry",
    "InputEncoding", "PublicContext", "SealKit",
    "decrypt_batch", "decrypt_logits", "encrypt_batch", "encrypt_batch_bytes", "encrypt_input",
    "encrypt_input_bytes",
    "affine_layers", "load_public", "make_context", "public_bytes",
]
