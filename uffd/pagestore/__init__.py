"""The page store: snapshot files, the page server that serves them over TCP, a Redis store.

One module per job:

- ``snapshot``: the snapshot file format (regions of pages in checksummed
  chunks, zero runs not stored) and raw memory files;
- ``protocol``: the page-server wire protocol (docs/protocol.md);
- ``server``: the asyncio page server (``uffd serve``);
- ``client``: its clients, asyncio and threaded;
- ``chunkstore``: content-addressed chunks (SHA-256) and their manifest
  (docs/chunkstore.md);
- ``redis_store``: chunks and manifests in Redis or Redis Cluster (redis-py,
  the ``redis`` extra): ``uffd snapshot push`` and ``pull``;
- ``chunkcache``: a host's cache of verified chunks, memory and directory;
- ``capture``: a snapshot of a live process's memory (``uffd snapshot create``).

Private helpers: ``_sendplan`` (the server's bulk reply as non-blocking
sendfile turns), ``_faults`` (its fault channels, served in C),
``_ratelog`` (its logging, which a flood of connections cannot flood) and
``_tls`` (TLS on memory BIOs for the threaded client).

Nothing here needs userfaultfd; the compiled extension only serves fault
channels (without it they take the asyncio path).
"""
