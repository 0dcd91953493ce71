"""Channels between services: the ``Bus`` interface (``bus``), its Redis implementation
(``redis_bus``), its in-memory implementation for tests of service loops (``memory_bus``)
and the embedded Redis server of the local stack (``redis_embed``)."""
