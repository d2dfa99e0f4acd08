"""The on-storage format: every document cloudckpt writes, one writer and one reader each.

* :mod:`~cloudckpt.format.jsonio`: the checksummed JSON envelope of every document below.
* :mod:`~cloudckpt.format.step`: ``_CHECKPOINT_METADATA`` and ``FORMAT_VERSION``.
* :mod:`~cloudckpt.format.pytree`: ``<item>/pytree.json`` and ``PYTREE_FORMAT``.
* :mod:`~cloudckpt.format.layout`: how a pytree's bytes lie in storage (zarr
  metadata, pack entries and their crc32c).
* :mod:`~cloudckpt.format.packed`: packed leaves in ``pytree.json`` (entry lists,
  and format 3's pack grids).
* :mod:`~cloudckpt.format.backing`: whether one listing backs a ``pytree.json``.
* :mod:`~cloudckpt.format.json_item`: ``<item>/data.json``.

Claims and commit markers belong to :mod:`atomicity`. Readers treat every
byte as untrusted and accept exactly what the writers produce
(docs/FORMAT.md); an older version is turned into the current record inside
its reader. This package imports only :mod:`cloudckpt.storage`,
:mod:`cloudckpt.errors` and :mod:`atomicity`, so handlers and tools share it.
"""
