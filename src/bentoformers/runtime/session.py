"""Where a graph runs: the device choice, and the one ONNX Runtime session factory (with the CUDA check)."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def pick_device(requested: str = "auto") -> str:
    import onnxruntime as ort

    # onnxruntime-gpu lists the CUDA provider even where no GPU driver is (libcuda.so.1), and then runs
    # on CPU with only a log line; "auto" therefore also asks for the driver.
    has_cuda = "CUDAExecutionProvider" in ort.get_available_providers() and _has_cuda_driver()
    if requested == "cuda" and not has_cuda:
        raise RuntimeError("device=cuda was asked for, but onnxruntime has no usable CUDAExecutionProvider")
    if requested == "auto":
        return "cuda" if has_cuda else "cpu"
    return requested


def cuda_likely(requested: str = "auto") -> bool:
    """What `pick_device(requested)` will say, without loading ONNX Runtime: for the supervisor process, which
    composes the service only to learn its processes. The CUDA provider ships in onnxruntime-gpu's package."""
    if requested != "auto":
        return requested == "cuda"
    spec = importlib.util.find_spec("onnxruntime")
    if spec is None or spec.origin is None:
        return False
    provider = any((Path(spec.origin).parent / "capi").glob("libonnxruntime_providers_cuda.so*"))
    return provider and _has_cuda_driver()


# ONNX Runtime's fusions that make an encoder's CPU graph slower: its SkipLayerNormalization (the residual add fused
# into the layer norm) ran MiniLM 7-15 % slower in fp32 and 3 % in int8 than an Add and a LayerNormalization (2-vCPU
# Zen 5; ~4x the pair's time at one short text on a Zen 4). The build leaves it out of encoders' CPU graphs
# (build/export.py), and their CPU sessions must not fuse it back at load (decoders were not timed without it and
# keep it). ONNX Runtime ignores a name it does not know: a test checks this one.
ENCODER_CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)


def open_session(
    path: str | Path, device: str = "cpu", intra_op_threads: int = 0, inter_op_threads: int = 0, spinning: bool = True,
    cpu_disabled_optimizers: tuple[str, ...] = (),
):
    """The one way a graph is opened: an ONNX Runtime session on `device`, which really runs there. `spinning`:
    ONNX Runtime's default, its threads spin-wait between operators rather than sleep. `cpu_disabled_optimizers`:
    ONNX Runtime's graph optimizers not to run at load on CPU.

    ONNX Runtime falls back to CPU with only a log line when CUDA cannot start; a model service that then
    said `cuda` in /v1/models and its metrics would be lying, so that is an error here.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads  # 0: ONNX Runtime's default (one per core)
    options.inter_op_num_threads = inter_op_threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    if device == "cuda" and hasattr(ort, "preload_dlls"):
        ort.preload_dlls()  # CUDA and cuDNN from the nvidia-* wheels (the GPU image has no system CUDA)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    disabled = [] if device == "cuda" else list(cpu_disabled_optimizers)
    session = ort.InferenceSession(str(path), options, providers=providers, disabled_optimizers=disabled)
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise RuntimeError(f"ONNX Runtime could not start CUDA for {path} (see its log above); not serving on CPU")
    return session


def _has_cuda_driver() -> bool:
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True
