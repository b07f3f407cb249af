"""The offline build: checkpoint -> ONNX -> quantized -> validated against PyTorch -> model store."""
