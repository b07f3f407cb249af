"""How the encoder's ONNX Runtime session is set up on CPU."""

from __future__ import annotations

from bentoformers.runtime.encoder import OnnxEncoder


def _spinning(encoder: OnnxEncoder) -> str:
    return encoder.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")


def test_encoder_threads_sleep_between_operators_unless_told_to_spin(minilm_path):
    """Spinning threads took the cores the gateway's event loop and its clients needed (README, Benchmark)."""
    assert _spinning(OnnxEncoder(minilm_path["int8"], threads=2)) == "0"
    assert _spinning(OnnxEncoder(minilm_path["int8"], threads=2, spinning=True)) == "1"
