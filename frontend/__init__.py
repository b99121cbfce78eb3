"""The backend-neutral front end: what a router and controller in front of vLLM replicas do, written once.

- ``engine_args``: ``EngineArgs``, the vLLM engine arguments both backends share.
- ``graph``: ``CallGraph``, which call is released when (roots at arrival, dependents after parents + think).
- ``ledger``: ``Ledger``, the records of every call, and the observations policies get from them.
- ``core``: ``FrontEnd``, release, routing, pending calls, scaling and sampling over a ``Backend``.
- ``results``: ``Results``, one schema for what a run produced, whichever backend ran it.
"""
