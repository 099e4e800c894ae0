"""The HTTP and WebSocket routes, a few lines each: validation is the wire models', work is
`ImageServing`'s, errors are mapped by `hypergen.errors`."""
