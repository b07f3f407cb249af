"""bentoformers: Hugging Face Transformers checkpoints to production BentoML services."""

__version__ = "0.1.0"
