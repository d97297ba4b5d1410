"""Make CrypTen 0.4.1 importable and usable on torch 2.13, and start MPC parties.

CrypTen 0.4.1 was written against torch ~1.13/2.0; two things broke since:

* ``crypten.nn.onnx_converter`` imports ``torch.onnx._internal.registration``,
  which moved to ``torch.onnx._internal.torchscript_exporter.registration``.
* ``crypten.nn.from_pytorch`` calls ``torch.onnx.export`` relying on the
  TorchScript exporter, but ``torch.onnx.export`` now defaults to
  ``dynamo=True``, which needs ``onnxscript`` and ignores the
  ``register_custom_op_symbolic`` overrides CrypTen installs (softmax,
  log_softmax, dropout).

Always import CrypTen through :func:`load_crypten`.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from types import ModuleType

_OLD_REGISTRATION = "torch.onnx._internal.registration"
_NEW_REGISTRATION = "torch.onnx._internal.torchscript_exporter.registration"

_crypten: ModuleType | None = None


def _export_pytorch_model(f, pytorch_model, dummy_input):
    """Replacement for ``crypten.nn.onnx_converter._export_pytorch_model``.

    Same kwargs as CrypTen's original, plus ``dynamo=False`` so the legacy
    TorchScript exporter (which honours ``register_custom_op_symbolic``) is used.
    """
    import torch
    from crypten.nn import onnx_converter

    with warnings.catch_warnings():
        # The legacy exporter is chosen deliberately; silence its deprecation notices.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            pytorch_model,
            dummy_input,
            f,
            do_constant_folding=False,
            export_params=True,
            input_names=["input"],
            operator_export_type=torch.onnx.OperatorExportTypes.ONNX,
            output_names=["output"],
            opset_version=onnx_converter._OPSET_VERSION,
            dynamo=False,
        )
    return f


def load_crypten() -> ModuleType:
    """Return the ``crypten`` module, patched for this torch (idempotent)."""
    global _crypten
    if _crypten is not None:
        return _crypten

    # The registry module moved; alias the new location under the old name so
    # `from torch.onnx._internal.registration import registry` in
    # crypten/nn/onnx_converter.py succeeds. Only when the old path is gone.
    try:
        importlib.import_module(_OLD_REGISTRATION)
    except ModuleNotFoundError:
        sys.modules[_OLD_REGISTRATION] = importlib.import_module(_NEW_REGISTRATION)

    import crypten
    from crypten.nn import onnx_converter

    # torch.onnx.export now defaults to the dynamo exporter (needs onnxscript)
    # which bypasses the symbolics _update_onnx_symbolic_registry() installs via
    # torch.onnx.register_custom_op_symbolic; only the TorchScript exporter
    # honours them, so force dynamo=False.
    onnx_converter._export_pytorch_model = _export_pytorch_model

    _crypten = crypten
    return crypten


def init_party(rank: int, world_size: int, master_addr: str, master_port: int) -> ModuleType:
    """Join a ``world_size``-party CrypTen world as ``rank`` via env:// rendezvous."""
    crypten = load_crypten()
    # RENDEZVOUS must be set explicitly: CrypTen otherwise defaults it to a
    # per-process random file:// path, so parties never meet (or any other
    # rendezvous value left in the environment silently diverges from
    # MASTER_ADDR/MASTER_PORT below).
    os.environ["RENDEZVOUS"] = "env://"
    os.environ["MASTER_ADDR"] = master_addr
    os.environ["MASTER_PORT"] = str(master_port)
    os.environ["WORLD_SIZE"] = str(world_size)
    os.environ["RANK"] = str(rank)
    crypten.init()
    return crypten
