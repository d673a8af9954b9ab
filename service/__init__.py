"""The online side of the inline inspection service: decode, tile, score, decide, serve.

Never imports torch or model_export (tests/unit/test_dependency_direction.py).
"""
