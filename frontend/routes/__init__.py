"""HTTP routes: thin handlers that parse, check, and hand over to frontend.serving."""
