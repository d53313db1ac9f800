"""Everything that talks to Redis: reaching it (clients for one node or a Cluster, deadlines, what
a failure means: ``client.py``, ``deadline.py``), the profile store (``profiles.py``) and its
Lua scripts (``lua/``), and what a write's durability depends on (``replication.py``: WAIT,
cluster nodes; ``health.py``: AOF, memory, roles). The item store and the epoch watch use the
same client and deadlines."""
