"""Credentials (API keys, JWT) and rate limits: who is calling, and how much they may."""
