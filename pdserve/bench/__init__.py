"""Serving load test (`pdserve bench serve`): datasets, arrivals, a streaming client, metrics, plots.

Mirrors `vllm bench serve`: same flag names and the same result JSON keys where they exist.
"""
