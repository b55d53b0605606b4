"""The RQ-Transformer paper's sampling-speed benchmark: `python -m measure_throughput f=32 d=4 c=16384 model=huge`."""
