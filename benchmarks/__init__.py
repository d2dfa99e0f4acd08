"""``make bench``: cloudckpt measured against the raw storage channel and against Orbax.

Entry point: ``python -m benchmarks.run`` (see its ``--help``). Scenarios, each
a module registering one function with :func:`benchmarks.common.scenario`:

* ``throughput`` - save/restore of the main tree per backend vs raw and Orbax;
* ``memory`` - peak RSS of a save above baseline, in fresh processes;
* ``blocking`` - how long an async save blocks vs a plain device-to-host copy;
* ``scaling`` - save time vs size and vs leaf count, and the 10,000-leaf goal.
"""
