"""The ``xio`` command line: thin Click commands over the library."""
