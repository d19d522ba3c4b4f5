"""Fixtures for the SDK and integration tests (a local OpenAI-compatible endpoint, clients)."""
