"""guardkit benchmarks: the engine benchmark (``python -m guardkit_server.bench.engine``) and the
server benchmark (``guardkit-server bench``). Results land in ``docs/benchmarks/``."""
