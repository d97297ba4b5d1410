"""An HE inference client written from he.proto alone: generated stubs, grpc, TenSEAL and numpy.

Run by tests/test_he_service.py in an isolated interpreter (``python -I``) to show that the wire contract is
complete: nothing of securecollab is imported (checked at the end). Usage:

    he_outsider_client.py STUBS_DIR TARGET CA CERT KEY IMAGES.npy OUT.json
"""

import hashlib
import json
import os
import struct
import sys
import tempfile
import uuid

STUBS, TARGET, CA, CERT, KEY, IMAGES, OUT = sys.argv[1:8]
sys.path.insert(0, STUBS)

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import tenseal as ts  # noqa: E402
from tenseal import sealapi  # noqa: E402

from securecollab_wire.v1 import he_pb2, he_pb2_grpc, tensor_pb2  # noqa: E402


def seal_bytes(obj) -> bytes:
    """SEAL objects of both bindings serialize through a file path only."""
    fd, path = tempfile.mkstemp()
    os.close(fd)
    try:
        obj.save(path)
        with open(path, "rb") as f:
            return f.read()
    finally:
        os.unlink(path)


def seal_load(obj, context, data: bytes):
    fd, path = tempfile.mkstemp()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        obj.load(context, path) if context is not None else obj.load(path)
        return obj
    finally:
        os.unlink(path)


def chunks(payload: bytes, size: int = 1 << 20):
    transfer, total = uuid.uuid4().hex, max(1, -(-len(payload) // size))
    digest = hashlib.sha256(payload).digest()
    for seq in range(total):
        yield tensor_pb2.Chunk(transfer_id=transfer, seq=seq, total=total, total_bytes=len(payload),
                               data=payload[seq * size:(seq + 1) * size], sha256=digest if seq == total - 1 else b"")


creds = grpc.ssl_channel_credentials(*(open(p, "rb").read() for p in (CA, KEY, CERT)))
channel = grpc.secure_channel(TARGET, creds)
stub = he_pb2_grpc.HEInferenceStub(channel)
d = stub.Describe(he_pb2.DescribeRequest(), timeout=60)

# 1. keys: a TenSEAL context with the described parameters; SEAL's own objects for the rest
p = d.ckks
ctx = ts.context(ts.SCHEME_TYPE.CKKS, p.poly_modulus_degree, coeff_mod_bit_sizes=list(p.coeff_mod_bit_sizes))
ctx.global_scale = 2.0 ** p.scale_bits
parms = seal_load(sealapi.EncryptionParameters(sealapi.SCHEME_TYPE.CKKS), None,
                  seal_bytes(ctx.seal_context().data.key_context_data().parms()))
seal = sealapi.SEALContext(parms, True, sealapi.SEC_LEVEL_TYPE.TC128)
secret = seal_load(sealapi.SecretKey(), seal, seal_bytes(ctx.secret_key().data))
two_n = 2 * p.poly_modulus_degree
elements = sorted({pow(3, step, two_n) for step in d.galois_steps})  # SEAL: generator 3, steps > 0
galois = seal_bytes(sealapi.KeyGenerator(seal, secret).create_galois_keys(elements)) if elements else b""

# 2. the session: the framing OpenSession documents
public = ctx.serialize(save_public_key=True, save_secret_key=False, save_galois_keys=False, save_relin_keys=True)
blob = b"SCHE1" + struct.pack(">Q", len(public)) + public + galois
parts = [he_pb2.SessionPart(options=he_pb2.SessionOptions(batch_size=0))]
session = stub.OpenSession(iter(parts + [he_pb2.SessionPart(context=c) for c in chunks(blob)]), timeout=300)

# 3. queries: gather the input into the described slots, encrypt symmetrically, decrypt the logit slots
encoder, slots = sealapi.CKKSEncoder(seal), p.poly_modulus_degree // 2
encryptor, decryptor = sealapi.Encryptor(seal, secret), sealapi.Decryptor(seal, secret)
source = np.array(d.input_layout.source, dtype=np.int64)
images = np.load(IMAGES)  # allow_pickle stays False
he_logits, plain_logits, up, down = [], [], 0, 0
for qid, x in enumerate(images):
    periods = np.where(source >= 0, x.ravel()[np.maximum(source, 0)], 0.0).reshape(-1, d.input_layout.period)
    ciphertexts = []
    for one_period in periods:  # one ciphertext per period of the layout (several for a large input)
        plain = sealapi.Plaintext()
        encoder.encode(np.tile(one_period, slots // d.input_layout.period).tolist(), seal.first_parms_id(),
                       2.0 ** p.scale_bits, plain)
        ciphertexts.append(seal_bytes(encryptor.encrypt_symmetric(plain)))
    assert len(ciphertexts) == max(1, d.input_layout.ciphertexts)
    reply = stub.Infer(he_pb2.InferRequest(session_id=session.session_id, query_id=qid, ciphertext=ciphertexts[0],
                                           more_ciphertexts=ciphertexts[1:]), timeout=120)
    result = seal_load(sealapi.Ciphertext(), seal, reply.ciphertext)
    decrypted = sealapi.Plaintext()
    decryptor.decrypt(result, decrypted)
    values = np.asarray(encoder.decode_double(decrypted))
    he_logits.append(values[list(d.logit_slots)].tolist())
    up, down = up + sum(map(len, ciphertexts)), down + len(reply.ciphertext)
    tensor = tensor_pb2.Tensor(dtype=tensor_pb2.DTYPE_FLOAT32, shape=[1, *d.input_shape],
                               data=np.asarray(x, "<f4").tobytes())
    answer = stub.PredictPlain(he_pb2.PlainRequest(inputs=tensor), timeout=60).logits
    plain_logits.append(np.frombuffer(answer.data, "<f4").reshape(tuple(answer.shape))[0].tolist())
stub.CloseSession(he_pb2.CloseRequest(session_id=session.session_id), timeout=60)

ours = sorted(m for m in sys.modules if m == "securecollab" or m.startswith("securecollab."))
with open(OUT, "w") as f:
    json.dump({"he_logits": he_logits, "plain_logits": plain_logits, "securecollab_modules": ours,
               "stubs_from": os.path.dirname(os.path.dirname(os.path.dirname(he_pb2.__file__))),
               "bytes_per_query": (up + down) / len(images)}, f)
