"""lbctl's benchmark harness (`lbctl bench ...`): kept apart from the product, which never imports
it; only the CLI's `bench` commands load it, lazily. Tests may import it."""
