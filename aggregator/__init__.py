"""The fold (pure) and the DuckDB ledger: offsets, dedup ids, aggregates, dead letters."""
