"""The BentoML side: which models the store holds, and the gateway's queue to a model service."""
