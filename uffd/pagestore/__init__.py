"""The page store: snapshot files and the page server that serves them over TCP.

One module per job:

- ``snapshot``: the snapshot file format (regions of pages in checksummed
  chunks, zero runs not stored) and raw memory files;
- ``protocol``: the page-server wire protocol (docs/protocol.md);
- ``server``: the asyncio page server (``uffd serve``);
- ``client``: its clients, asyncio and threaded.

Nothing here needs userfaultfd or the compiled extension.
"""
