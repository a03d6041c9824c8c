"""The ``chargepki`` command line: a thin click shell over the core in ``ca/``."""
