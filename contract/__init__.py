"""Facts the API processes and the engines must agree on, kept once instead of in synchronized copies.

Both sides import this package, so it follows the stricter rules of both: the standard library, jinja2,
llguidance and protocol only; never torch, numpy, frontend, engine or tandem (tests/frontend/test_torch_free.py
checks it, as installed in an API-only venv too).
"""
