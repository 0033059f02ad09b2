"""Memory as a value: the state of a model's memory, its row space, the M+ long-term memory, row origins."""
