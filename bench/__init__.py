"""The measurements behind the documents: each script runs as ``.venv/bin/python -m bench.NAME`` from the
repository root. :mod:`bench.common` holds the layout, command builders and report helpers they share,
:mod:`bench.ledger` the resumable step runner, :mod:`bench.registry` the quick modes ``make bench`` runs."""
