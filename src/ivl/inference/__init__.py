"""Batched generation with a KV cache, the chat API, and the OpenAI-compatible server."""
