"""Pure model and decisions. No I/O, no asyncio, no HTTP: only data in, data out."""
