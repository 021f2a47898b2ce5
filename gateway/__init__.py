"""The gateway: gRPC front door and OpenAI REST routes in front of prefill/decode workers.

It depends only on the generated protos, the `tokenizers` library (plus jinja2 for chat
templates), FastAPI/uvicorn/pydantic and prometheus-client. It never imports torch or the
engine; `tests/gateway_tests/test_gateway_imports.py` enforces it.
"""
