"""storage: every byte in or out (volumes, boxes, ledger, the connectome store). Imports none of the other packages."""


def __getattr__(name: str):
    # Lazy so `import storage` stays light: the store pulls in duckdb/pyarrow/pandas only when used.
    if name in ("Connectome", "ConnectomeStore"):
        from storage import store

        return getattr(store, name)
    raise AttributeError(f"module 'storage' has no attribute {name!r}")
