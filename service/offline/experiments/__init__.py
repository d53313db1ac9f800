"""The offline path's experiments layer: the plan, sweeps and tuning, reproduce, the
cold-item protocol, generalisation checks, the results page."""
