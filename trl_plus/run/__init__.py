"""The application layer: what the ``trl-plus`` commands do (validate, train, evaluate, merge, report) and the
run-directory format they share (``rundir``)."""
