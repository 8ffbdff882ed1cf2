"""Target assignment, one module per scheme. Assigners never compute a loss."""
