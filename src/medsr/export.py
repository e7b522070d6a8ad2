"""ONNX export of a checkpoint, and an onnxruntime predictor for :mod:`medsr.infer`.

The exported graph maps ``lr`` (N, C, *spatial) float32 to ``sr`` (N, C, *(spatial * scale)), with the batch and
every spatial axis dynamic, so the tiler can feed it tiles of any size. The checkpoint's JSON description (model,
scale, modality, degradation, intensity convention, ...) is stored in the file's ``metadata_props`` under
``medsr.description``, so the file says what it is for; :func:`onnx_description` reads it back.

Export uses torch's ``torch.export``-based exporter (``dynamo=True``, torch's default since 2.9; it needs
``onnxscript``). The TorchScript-based exporter is deprecated and has no ONNX form for ``nearest-exact``
interpolation, so it cannot export RRDB. Opset 18 is the opset torch's ONNX function library is written in, so no
version conversion runs; onnxruntime runs it since 1.14.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from medsr.checkpoint import load_checkpoint
from medsr.infer import Predictor
from medsr.io import atomic_output, check_output

try:
    import onnx
    import onnxruntime
    import onnxscript  # noqa: F401  (torch's exporter imports it; fail here, with the fix in the message)
except ImportError as error:
    raise ImportError(
        f"ONNX export and inference need the 'onnx' extra: pip install 'medsr[onnx]' ({error})"
    ) from error

OPSET = 18
METADATA_KEY = "medsr.description"
TOLERANCE = 1e-4  # max abs difference from torch allowed at export, in model intensity units ([0, 1] scans)


def export_onnx(checkpoint: Path | str, path: Path, *, force: bool = False) -> None:
    """Write a checkpoint's model to ``path`` as a self-contained ONNX file, atomically.

    The export is checked before it is written: onnxruntime and torch must agree within :data:`TOLERANCE` on a
    random input of another batch and spatial size than the one traced.

    Args:
        checkpoint: A checkpoint folder or the name of a shipped model (see :func:`medsr.checkpoint.shipped_models`).
        path: The ``.onnx`` file to write; its folder must exist.
        force: Replace ``path`` if it exists.
    """
    path = Path(path)
    check_output(path, force=force)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"{path}: folder {path.parent} does not exist")
    model, description = load_checkpoint(checkpoint)
    kwargs = description["model_kwargs"]
    spatial_dims, channels = kwargs["spatial_dims"], kwargs.get("in_channels", 1)
    generator = torch.Generator().manual_seed(0)
    # Distinct sizes > 1: torch.export specialises axes of size 0 or 1, and may tie axes of equal size.
    example = torch.rand(2, channels, *(17, 14, 11)[:spatial_dims], generator=generator)
    axes = {0: "batch"} | {2 + d: "ijk"[d] for d in range(spatial_dims)}
    program = torch.onnx.export(
        model,
        (example,),
        dynamo=True,
        opset_version=OPSET,
        input_names=["lr"],
        output_names=["sr"],
        dynamic_shapes=(axes,),  # positional: whatever forward names its argument
        verbose=False,
    )
    proto = program.model_proto
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(description, sort_keys=True))

    check = torch.rand(3, channels, *(9, 12, 7)[:spatial_dims], generator=generator)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        error = (torch.from_numpy(session.run(None, {"lr": check.numpy()})[0]) - model(check)).abs().max().item()
    if not error <= TOLERANCE:  # NaN fails too
        raise RuntimeError(f"{checkpoint}: the ONNX export differs from torch by {error:.2e} > {TOLERANCE:g}")

    with atomic_output(path) as tmp:
        onnx.save_model(proto, tmp)  # weights inside the file: well under protobuf's 2 GB limit


def onnx_description(path: Path) -> dict[str, Any]:
    """The checkpoint description stored in an ONNX file by :func:`export_onnx`."""
    properties = {p.key: p.value for p in onnx.load(path).metadata_props}
    if METADATA_KEY not in properties:
        raise ValueError(f"{path}: no {METADATA_KEY!r} metadata; not exported by medsr.export_onnx")
    return json.loads(properties[METADATA_KEY])


def onnx_predictor(path: Path, *, threads: int | None = None) -> Predictor:
    """Run an exported model with onnxruntime on the CPU, as a predictor for :func:`medsr.infer.predict_tiled`.

    Args:
        path: An ONNX file written by :func:`export_onnx`.
        threads: Intra-op threads; None lets onnxruntime use one per physical core.

    Returns:
        A function mapping (N, C, *tile) float tensors (any device) to (N, C, *(tile * scale)) float32 CPU tensors.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file")
    options = onnxruntime.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def predict(batch: torch.Tensor) -> torch.Tensor:
        array = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(session.run(None, {name: array})[0])

    return predict
