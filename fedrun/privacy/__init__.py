"""Privacy mechanisms: hooks on each client's update and on the aggregate, with accounting.

Each mechanism is one class in its own module, named by its conf/privacy/*.yaml; nothing is
imported here, so importing one mechanism does not import the others (or their libraries)."""
