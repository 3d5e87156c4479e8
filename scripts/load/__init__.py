"""The load test as a package: ``rawclient`` (the client processes), ``targets`` (what is measured),
``publisher``, ``scenarios``, ``results`` (one dataclass per scenario), ``report``, ``cli``.
Run it as ``scripts/loadtest`` or ``wsbroadcast-loadtest``; ``--help`` lists the options."""
