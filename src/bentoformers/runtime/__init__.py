"""Runs a built graph: tokenizer, ONNX Runtime sessions, encoder, decoder, the start-up proof. No HTTP, no BentoML."""
