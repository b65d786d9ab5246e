"""Privacy mechanisms: hooks on each client's update and on the aggregate."""
