"""OpenAI-compatible REST routes on top of the gateway core."""
