"""The offline path's evaluation layer: metrics, the evaluation protocols, attention diagnostics."""
