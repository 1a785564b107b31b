"""The application layer: what the ``trl-plus`` commands do (validate, train, evaluate, merge, report, the
``new`` scaffold) and the run-directory format they share (``rundir``)."""
