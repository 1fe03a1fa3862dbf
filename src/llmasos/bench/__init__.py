"""`llmasos bench`: each workload in its own module, sharing the table and machine facts of `common`."""
