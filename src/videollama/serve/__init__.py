"""Serving: the batching engine, the OpenAI-compatible API and the web chat UI."""
