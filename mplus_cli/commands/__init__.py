"""One module per command group: each command parses its options, calls the library and prints."""
