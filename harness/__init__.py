"""Real processes on loopback for the tests and the benchmarks: free ports, waiting for an
answer, the API under uvicorn, a Redis server or a Redis Cluster of one's own, the catalogues
they serve. ``tests/`` and ``benchmarks/`` both import it; neither imports the other, and
nothing in ``service/`` imports it."""
