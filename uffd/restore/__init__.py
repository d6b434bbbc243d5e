"""Lazy restore of another process's memory: the handler daemon and what it runs.

One module per job:

- ``daemon``: :class:`~uffd.restore.daemon.HandlerDaemon`, which accepts
  processes on a Unix socket and runs one session each (``uffd handler``);
- ``firecracker``: Firecracker's UFFD handshake (SCM_RIGHTS fd + JSON
  regions) and peer credentials;
- ``prefetch``: working sets and the adaptive prefetch chunk policy;
- ``sources``: the page source, a snapshot file or a page server seen as one
  flat image (``FileSource``, ``RemoteSource``);
- ``redis_source``: a snapshot in a Redis (Cluster) chunk store as the same
  kind of source (``RedisSource``, ``redis://`` URLs);
- ``layout``: where each byte of the restored process's memory is (host
  address, session flat offset, source offset);
- ``report`` and ``progress``: what a session did, and its shared tally
  (report, prefetch plan, pages faulted) under one lock;
- ``parts``: what the fault path and the prefetch thread of a session share;
- ``faults``: the ``UffdOps`` that serve MISSING faults from the source;
- ``prefetch_thread``: the background installs (working set, then adaptive
  chunks);
- ``session``: one restored process: its FaultHandler, threads and end.

References: userfaultfd(2), ioctl_userfaultfd(2).
"""
